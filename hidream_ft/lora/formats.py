"""Reading LoRA files of any known key style into a :class:`LoraAdapter`, and writing the inference formats.

Writers: a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``) and single
``.safetensors`` files in the comfyui, kohya and musubi styles (see :mod:`hidream_ft.lora.keys`).
Every file carries string metadata in its safetensors header (:func:`lora_metadata`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from hidream_ft.errors import listing
from hidream_ft.lora.adapter import LoraAdapter, LoraModule, alpha_from_peft, lora_module, peft_alpha
from hidream_ft.lora.errors import ConvertError
from hidream_ft.lora.keys import ALPHA, DOWN, STYLES, UP, WRITABLE_STYLES, parse_lora_keys, template_of
from hidream_ft.model.safetensors_io import open_safetensors, read_safetensors

log = logging.getLogger("hidream_ft.lora")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
META = "hidream_ft."
# Provenance carried from a file's header into the adapter and on into every file written from it.
PROVENANCE = ("base_model", "training_steps", "trigger", "targets")


def _provenance(header: dict[str, str]) -> dict[str, str]:
    return {META + k: header[META + k] for k in PROVENANCE if header.get(META + k)}


def read_lora_file(path: str | Path) -> LoraAdapter:
    """A LoRA ``.safetensors`` file in any known key style (inside a PEFT directory: that directory)."""
    path = Path(path)
    if (path.parent / PEFT_CONFIG).is_file() and path.name == PEFT_WEIGHTS:
        return read_peft_dir(path.parent)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    if path.suffix != ".safetensors":
        raise ConvertError(f"{path}: only .safetensors LoRA files can be read")
    with open_safetensors(path) as f:
        header = f.metadata() or {}
    tensors = read_safetensors(path)

    def alpha_tensor(module_path: str, parts: dict[str, str], rank: int) -> float | None:
        return tensors[parts[ALPHA]].item() if ALPHA in parts else None

    modules = _modules(tensors, str(path), alpha_tensor)
    return LoraAdapter(modules, header.get(META + "use_rslora") == "true", _provenance(header))


def _modules(tensors: dict[str, torch.Tensor], where: str,
             alpha_of: Callable[[str, dict[str, str], int], float | None]) -> dict[str, LoraModule]:
    """Checked modules from LoRA tensors in any key style; ``alpha_of(path, keys, rank)`` gives each alpha.
    Convolution LoRAs are left out with a one-line warning."""
    parsed = parse_lora_keys(tensors, where)
    if parsed.skipped:
        log.warning("%s: skipping the LoRA of %s: only linear layers are supported (convolution LoRAs, e.g. "
                    "musubi-tuner's conv_dim, are not applied)", where, listing(parsed.skipped))
    modules = {}
    for module_path, parts in parsed.parts.items():
        down, up = tensors[parts[DOWN]], tensors[parts[UP]]
        modules[module_path] = lora_module(module_path, down, up, alpha_of(module_path, parts, down.shape[0]), where)
    return modules


def _pattern_value(patterns: dict, path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern matching the end of the module path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def adapter_from_peft_state(tensors: dict[str, torch.Tensor], config: dict, where: str) -> LoraAdapter:
    """PEFT-keyed tensors (``….lora_A.weight`` or ``….lora_A.default.weight``) with the ``lora_alpha``,
    ``alpha_pattern`` and ``use_rslora`` of their PEFT config."""
    use_rslora = bool(config.get("use_rslora", False))

    def configured_alpha(module_path: str, parts: dict[str, str], rank: int) -> float:
        lora_alpha = _pattern_value(config.get("alpha_pattern") or {}, module_path, config["lora_alpha"])
        return alpha_from_peft(lora_alpha, rank, use_rslora)

    modules = _modules(tensors, where, configured_alpha)
    metadata = {}
    if config.get("base_model_name_or_path"):
        metadata[META + "base_model"] = str(config["base_model_name_or_path"])
    if isinstance(config.get("target_modules"), str):
        metadata[META + "targets"] = config["target_modules"]
    return LoraAdapter(modules, use_rslora, metadata)


def read_peft_dir(path: str | Path) -> LoraAdapter:
    """A PEFT LoRA directory: ``adapter_config.json`` (ranks, alphas, rsLoRA) + ``adapter_model.safetensors``."""
    path = Path(path)
    config_file, weights_file = path / PEFT_CONFIG, path / PEFT_WEIGHTS
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise ConvertError(f"{path}: not a PEFT adapter directory ({needed.name} is missing)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{config_file}: invalid JSON: {e}") from None
    if config.get("peft_type") != "LORA":
        raise ConvertError(f"{config_file}: peft_type is {config.get('peft_type')!r}; only LORA adapters convert")
    if config.get("use_dora"):
        raise ConvertError(f"{config_file}: DoRA adapters cannot be written as plain LoRA files")
    if "lora_alpha" not in config:
        raise ConvertError(f"{config_file}: lora_alpha is missing")
    with open_safetensors(weights_file) as f:
        header = f.metadata() or {}
    adapter = adapter_from_peft_state(read_safetensors(weights_file), config, str(weights_file))
    adapter.metadata = {**adapter.metadata, **_provenance(header)}
    return adapter


def _uniform(values) -> str:
    """The one value of all modules (6 significant digits, "8" not "8.0"), or "mixed"."""
    distinct = {f"{float(value):.6g}" for value in values}
    return distinct.pop() if len(distinct) == 1 else "mixed"


def lora_metadata(adapter: LoraAdapter) -> dict[str, str]:
    """The safetensors header: our ``hidream_ft.*`` keys plus the kohya (``ss_network_*``) and model-spec
    keys that UIs read to show rank, alpha and trigger phrase. All values are strings."""
    metadata = {"format": "pt", **adapter.metadata}
    metadata.setdefault(META + "targets", ",".join(sorted({template_of(p) for p in adapter.modules})))
    kohya_alpha = _uniform(adapter.alphas().values())
    metadata.update({
        META + "rank": _uniform(adapter.ranks().values()),
        META + "alpha": _uniform(peft_alpha(m, adapter.use_rslora) for m in adapter.modules.values()),
        META + "use_rslora": str(adapter.use_rslora).lower(),
        META + "modules": str(len(adapter.modules)),
        "modelspec.architecture": "hidream-o1-image/lora",
    })
    if metadata[META + "rank"] != "mixed":
        metadata["ss_network_dim"] = metadata[META + "rank"]
    if kohya_alpha != "mixed":
        metadata["ss_network_alpha"] = kohya_alpha
    if adapter.metadata.get(META + "trigger"):
        metadata["modelspec.trigger_phrase"] = adapter.metadata[META + "trigger"]
    return metadata


def write_peft_dir(adapter: LoraAdapter, out: str | Path, peft_config=None) -> Path:
    """A directory ``PeftModel.from_pretrained`` loads onto HiDreamO1 or ``Qwen3VLForConditionalGeneration``.

    ``peft_config`` is the ``peft.LoraConfig`` to store (the trainer's keeps its target regex and dropout);
    by default the one :meth:`LoraAdapter.peft_config` rebuilds. Both files are written next to ``out`` first
    and then moved in, so an interrupted write never leaves a half-written adapter under ``out``.
    """
    out = Path(out)
    if out.is_file():
        raise ConvertError(f"{out} is a file; the peft format writes a directory")
    if peft_config is None:
        peft_config = adapter.peft_config(adapter.metadata.get(META + "base_model"))
    partial = out.resolve().with_name(f".{out.resolve().name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    peft_config.save_pretrained(str(partial))
    state = {k: v.contiguous() for k, v in adapter.peft_state_dict().items()}
    save_file(state, str(partial / PEFT_WEIGHTS), metadata=lora_metadata(adapter))
    if not out.exists():
        partial.rename(out)
        return out
    for name in (PEFT_WEIGHTS, PEFT_CONFIG):  # into an existing directory: file by file, each one atomic
        os.replace(partial / name, out / name)
    shutil.rmtree(partial)
    return out


def single_file_state(adapter: LoraAdapter, style_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the keys of a single-file style; modules the style cannot name (outside
    the diffusion model, e.g. ``lm_head``) are refused with their names."""
    style = STYLES[style_name]
    unnamed = [p for p in adapter.modules if style.module_name(p) is None]
    if unnamed:
        raise ConvertError(f"the {style_name} format only covers modules under model. (the diffusion model); "
                           f"this adapter also has {listing(unnamed)} — use the peft or musubi format")
    state = {}
    for path, module in sorted(adapter.modules.items()):
        state[style.key(path, DOWN)] = module.down.contiguous()
        state[style.key(path, UP)] = module.up.contiguous()
        if style.alpha == "always" or (style.alpha == "if_not_rank" and module.alpha != module.rank):
            state[style.key(path, ALPHA)] = torch.tensor(module.alpha, dtype=torch.float32)
    return state


def write_lora(adapter: LoraAdapter, style_name: str, out: str | Path) -> Path:
    """Write ``adapter`` as ``style_name`` (peft: a directory; comfyui / kohya / musubi: one file)."""
    if style_name not in WRITABLE_STYLES:
        raise ConvertError(f"cannot write the {style_name!r} format; choose from {', '.join(WRITABLE_STYLES)}")
    if not adapter.modules:
        raise ConvertError("the adapter has no LoRA modules")
    if style_name == "peft":
        return write_peft_dir(adapter, out)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConvertError(f"{out}: a {style_name} LoRA is a single file; name it *.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(single_file_state(adapter, style_name), str(out), metadata=lora_metadata(adapter))
    return out


def describe(adapter: LoraAdapter) -> str:
    """A few lines for humans: modules, ranks, scales, provenance."""
    ranks = Counter(adapter.ranks().values())
    scales = Counter(round(m.scale, 6) for m in adapter.modules.values())
    lines = [
        f"modules: {len(adapter.modules)}",
        "rank: " + ", ".join(f"{r} ({n} modules)" for r, n in sorted(ranks.items())),
        "scale (alpha/rank): " + ", ".join(f"{s} ({n} modules)" for s, n in sorted(scales.items())),
        f"use_rslora: {str(adapter.use_rslora).lower()}",
        "targets: " + ", ".join(sorted({template_of(p) for p in adapter.modules})),
    ]
    lines += [f"{k}: {v}" for k, v in sorted(adapter.metadata.items())]
    return "\n".join(lines)
