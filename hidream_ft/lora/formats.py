"""Reading LoRA files of any known key style into a :class:`LoraAdapter`, and writing the inference formats.

Writers: a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``, every adapter kind) and
single ``.safetensors`` files in the comfyui, kohya and musubi styles (see :mod:`hidream_ft.lora.keys`; LoHa
and LoKr under LyCORIS' tensor names). Every file carries string metadata in its header (:func:`lora_metadata`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from hidream_ft.errors import listing
from hidream_ft.lora.adapter import (
    AdapterModule, LokrModule, LoraAdapter, LoraModule, alpha_from_peft, kind_module, lora_module, peft_alpha,
)
from hidream_ft.lora.errors import ConvertError
from hidream_ft.lora.keys import (
    ALPHA, DOWN, STYLES, UP, WRITABLE_STYLES, architecture_index, parse_lora_keys, template_of,
)
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


PEFT_TYPES = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr"}
# A PEFT key of any adapter kind, in a saved adapter or (with the adapter name) in a trainer checkpoint.
_PEFT_KIND_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<part>lora_[AB]|lora_magnitude_vector|"
                            r"hada_w[12]_[ab]|lokr_w[12](?:_[ab])?)(?:\.default)?(?:\.weight)?$")


def peft_kind(config: dict, where: str) -> str:
    """The adapter kind a PEFT config (as a dict) describes."""
    peft_type = config.get("peft_type", "LORA")
    kind = PEFT_TYPES.get(getattr(peft_type, "value", peft_type))  # a PeftType member in a config's to_dict()
    if kind is None:
        raise ConvertError(f"{where}: peft_type is {config.get('peft_type')!r}; only LORA (and DoRA), LOHA and LOKR "
                           "adapters convert")
    return "dora" if kind == "lora" and config.get("use_dora") else kind


def _kind_modules(tensors: dict[str, torch.Tensor], kind: str, config: dict, where: str) -> dict[str, AdapterModule]:
    """DoRA, LoHa and LoKr modules from PEFT-keyed tensors and the ranks and alphas of their config."""
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unmatched = []
    for key, tensor in tensors.items():
        match = _PEFT_KIND_KEY.match(key)
        if match is None or not architecture_index().contains(match["path"]):
            unmatched.append(key)
        else:
            parts[match["path"]][match["part"]] = tensor
    if unmatched:
        raise ConvertError(f"{where}: {len(unmatched)} keys are no {kind} tensors of a linear layer of HiDream-O1 "
                           f"(expected PEFT keys like base_model.model.<module>.hada_w1_a): {listing(unmatched)}")
    alphas = config.get("alpha_pattern") or {}
    modules = {}
    for path, found in sorted(parts.items()):
        rank = _pattern_value(config.get("rank_pattern") or {}, path, config.get("r"))
        if kind == "dora":
            rank = found["lora_A"].shape[0] if "lora_A" in found else rank
            alpha = alpha_from_peft(_pattern_value(alphas, path, config["lora_alpha"]), rank,
                                    bool(config.get("use_rslora")))
        else:
            alpha = _pattern_value(alphas, path, config["alpha"])
        modules[path] = kind_module(kind, path, found, rank, alpha, where)
    return modules


def adapter_from_peft_state(tensors: dict[str, torch.Tensor], config: dict, where: str) -> LoraAdapter:
    """PEFT-keyed tensors (``….lora_A.weight`` or ``….lora_A.default.weight``, ``….hada_w1_a`` …) with the
    kind, ranks, alphas and ``use_rslora`` of their PEFT config (a dict)."""
    use_rslora = bool(config.get("use_rslora", False))
    kind = peft_kind(config, where)
    if kind == "lora":
        def configured_alpha(module_path: str, parts: dict[str, str], rank: int) -> float:
            lora_alpha = _pattern_value(config.get("alpha_pattern") or {}, module_path, config["lora_alpha"])
            return alpha_from_peft(lora_alpha, rank, use_rslora)

        modules = _modules(tensors, where, configured_alpha)
    else:
        modules = _kind_modules(tensors, kind, config, where)
    metadata = {}
    if config.get("base_model_name_or_path"):
        metadata[META + "base_model"] = str(config["base_model_name_or_path"])
    if isinstance(config.get("target_modules"), str):
        metadata[META + "targets"] = config["target_modules"]
    return LoraAdapter(modules, use_rslora, metadata, int(config.get("decompose_factor", -1)))


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
    alpha_key = "lora_alpha" if peft_kind(config, str(config_file)) in ("lora", "dora") else "alpha"
    if alpha_key not in config:
        raise ConvertError(f"{config_file}: {alpha_key} is missing")
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
        META + "kind": adapter.kind,
        META + "rank": _uniform(adapter.ranks().values()),
        META + "alpha": _uniform(peft_alpha(m, adapter.use_rslora) for m in adapter.modules.values()),
        META + "use_rslora": str(adapter.use_rslora).lower(),
        META + "modules": str(len(adapter.modules)),
        "modelspec.architecture": "hidream-o1-image/lora",
    })
    if adapter.kind in ("loha", "lokr"):  # how LyCORIS files say what they hold
        metadata["ss_network_module"] = "lycoris.kohya"
        metadata["ss_network_args"] = json.dumps({"algo": adapter.kind})
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


BaseWeight = Callable[[str], torch.Tensor]  # a module path's base weight, e.g. from the base checkpoint


def comfyui_dora_scale(module: LoraModule, weight: torch.Tensor) -> torch.Tensor:
    """The ``dora_scale`` [out, 1] with which ComfyUI reproduces the DoRA: given one per output row, ComfyUI
    rescales W + scale·B·A to ``dora_scale / (‖W‖ + eps)`` — the norm of the base row, where DoRA uses that of
    the adapted row — so the magnitude is stored times ‖W‖ / ‖W + scale·B·A‖ (eps is 1e-7 in fp32, negligible)."""
    weight = weight.float()
    adapted = weight + module.scale * (module.up.float() @ module.down.float())
    ratio = torch.linalg.vector_norm(weight, dim=1) / torch.linalg.vector_norm(adapted, dim=1)
    return (module.magnitude.float() * ratio)[:, None]


def _module_state(style_name: str, path: str, module: AdapterModule,
                  base_weight: BaseWeight | None) -> dict[str, torch.Tensor]:
    style = STYLES[style_name]
    alpha = module.alpha
    if isinstance(module, LoraModule):
        parts = {style.key(path, DOWN): module.down, style.key(path, UP): module.up}
        if module.magnitude is not None:
            if base_weight is None:
                raise ConvertError(f"a dora adapter in the {style_name} format needs the base weights: pass --base "
                                   "DIR (ComfyUI divides dora_scale by the norms of the base weight's rows)")
            parts[f"{style.module_name(path)}.dora_scale"] = comfyui_dora_scale(module, base_weight(path))
    else:
        tensors = module.tensors()
        if isinstance(module, LokrModule) and "lokr_w1" in tensors and "lokr_w2" in tensors:
            # With both factors whole, LyCORIS and ComfyUI apply scale 1 and ignore any alpha: fold the scale in.
            tensors["lokr_w2"] = module.scale * tensors["lokr_w2"].float()
            alpha = None
        parts = {f"{style.module_name(path)}.{name}": tensor for name, tensor in tensors.items()}
    if alpha is not None and (style.alpha == "always" or (style.alpha == "if_not_rank" and alpha != module.rank)):
        parts[style.key(path, ALPHA)] = torch.tensor(alpha, dtype=torch.float32)
    return {key: tensor.contiguous() for key, tensor in parts.items()}


def single_file_state(adapter: LoraAdapter, style_name: str,
                      base_weight: BaseWeight | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the keys of a single-file style; modules the style cannot name (outside
    the diffusion model, e.g. ``lm_head``) and kinds it cannot hold are refused. ``base_weight`` is needed for
    a DoRA in the comfyui style only."""
    style = STYLES[style_name]
    if adapter.kind not in style.kinds:
        holders = [name for name in WRITABLE_STYLES if adapter.kind in STYLES[name].kinds]
        raise ConvertError(f"the {style_name} format cannot hold a {adapter.kind} adapter; write it as "
                           + " or ".join(holders))
    if style_name == "musubi" and any("lokr_w1_a" in m.tensors() for m in adapter.modules.values()):
        # musubi-tuner's LoKr always has a whole first factor and skips the layers of any other.
        raise ConvertError("the musubi format cannot hold a lokr adapter with a decomposed first factor "
                           "(lora.lokr_decompose_both); write it as peft, comfyui or kohya")
    unnamed = [p for p in adapter.modules if style.module_name(p) is None]
    if unnamed:
        raise ConvertError(f"the {style_name} format only covers modules under model. (the diffusion model); "
                           f"this adapter also has {listing(unnamed)} — use the peft or musubi format")
    state = {}
    for path, module in sorted(adapter.modules.items()):
        state.update(_module_state(style_name, path, module, base_weight))
    return state


def write_lora(adapter: LoraAdapter, style_name: str, out: str | Path, base_weight: BaseWeight | None = None) -> Path:
    """Write ``adapter`` as ``style_name`` (peft: a directory; comfyui / kohya / musubi: one file).
    ``base_weight``: see :func:`single_file_state`."""
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
    save_file(single_file_state(adapter, style_name, base_weight), str(out), metadata=lora_metadata(adapter))
    return out


def describe(adapter: LoraAdapter) -> str:
    """A few lines for humans: modules, ranks, scales, provenance."""
    ranks = Counter(adapter.ranks().values())
    scales = Counter(round(m.scale, 6) for m in adapter.modules.values())
    lines = [
        f"kind: {adapter.kind}",
        f"modules: {len(adapter.modules)}",
        "rank: " + ", ".join(f"{r} ({n} modules)" for r, n in sorted(ranks.items())),
        "scale (alpha/rank): " + ", ".join(f"{s} ({n} modules)" for s, n in sorted(scales.items())),
        f"use_rslora: {str(adapter.use_rslora).lower()}",
        "targets: " + ", ".join(sorted({template_of(p) for p in adapter.modules})),
    ]
    lines += [f"{k}: {v}" for k, v in sorted(adapter.metadata.items())]
    return "\n".join(lines)
