"""Load HiDream-O1-Image from a directory in the official Hugging Face layout (or its weights from one
ComfyUI-style file): built on the meta device, optionally sharded, then filled tensor by tensor from the
safetensors files (docs/sampling.md, "Model internals")."""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import AutoTokenizer, Qwen3VLConfig

from hidream_ft.errors import UserError, listing
from hidream_ft.model.hidream import HiDreamO1, rope_parameters
from hidream_ft.model.layout import SpecialTokens
from hidream_ft.model.quantize import quantize_decoder_linears
from hidream_ft.model.safetensors_io import open_safetensors

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# What the single-file checkpoints of ComfyUI (and the tools that load them) leave out of the official key set:
# the LM head, which image generation never uses, and the ViT's DeepStack mergers, which ComfyUI does not use.
LM_HEAD = "lm_head."
COMFYUI_OMITTED = (LM_HEAD, "model.visual.deepstack_merger_list.")


class CheckpointError(UserError, ValueError):
    """The checkpoint directory does not hold a loadable HiDream-O1 model."""


def _model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory not found: {path} (set model.path to the HiDream-O1-Image folder)")
    return path


def load_hf_config(path: str | Path) -> Qwen3VLConfig:
    path = _model_dir(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing; expected the official HiDream-O1-Image layout")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: invalid JSON: {e}") from None
    if raw.get("model_type") != "qwen3_vl":
        raise CheckpointError(f"{config_file}: model_type is {raw.get('model_type')!r}, expected 'qwen3_vl'")
    config = Qwen3VLConfig.from_dict(raw)
    _validate_config(config, config_file)
    return config


def _validate_config(config: Qwen3VLConfig, where: Path) -> None:
    """transformers barely validates Qwen3-VL configs; inconsistent sizes only fail deep inside a forward."""
    text, vision = config.text_config, config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    try:
        _, section = rope_parameters(text)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    problems = []
    if sum(section) != head_dim // 2:
        problems.append(f"mrope_section {section} sums to {sum(section)}, expected head_dim/2 = {head_dim // 2}")
    if text.num_attention_heads % text.num_key_value_heads:
        problems.append("num_attention_heads must be a multiple of num_key_value_heads")
    if vision.out_hidden_size != text.hidden_size:
        problems.append(f"vision out_hidden_size {vision.out_hidden_size} != text hidden_size {text.hidden_size}")
    bad_deepstack = [i for i in vision.deepstack_visual_indexes if not 0 <= i < vision.depth]
    if bad_deepstack:
        problems.append(f"deepstack_visual_indexes {bad_deepstack} outside vision depth {vision.depth}")
    if len(vision.deepstack_visual_indexes) > text.num_hidden_layers:
        problems.append("more DeepStack feature sets than decoder layers")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))


def load_tokenizer(path: str | Path):
    path = _model_dir(path)
    if not (path / "tokenizer_config.json").is_file():
        raise CheckpointError(f"{path}: tokenizer files are missing (tokenizer_config.json, tokenizer.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.chat_template is None:
        raise CheckpointError(f"{path}: the tokenizer has no chat template")
    return tokenizer


def weight_files(path: str | Path) -> dict[str, Path]:
    """checkpoint key → the safetensors file that holds it: from the index or the single ``model.safetensors``
    of an official directory, or from ``path`` itself when it is one ``.safetensors`` file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        with open_safetensors(path) as f:
            return {key: path for key in f.keys()}
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = {key: path / name for key, name in weight_map.items()}
        missing = sorted({str(f) for f in files.values() if not f.is_file()})
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {listing(missing, 12)}")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        with open_safetensors(single) as f:
            return {key: single for key in f.keys()}
    raise CheckpointError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")


def build_meta_model(config: Qwen3VLConfig, tms_token_id: int, attention: str = "auto",
                     lm_head: bool = True) -> HiDreamO1:
    with torch.device("meta"):
        return HiDreamO1(config, tms_token_id=tms_token_id, attention=attention, lm_head=lm_head)


def restore_rotary_buffers(model: nn.Module) -> None:
    """Non-persistent rotary buffers are not in the checkpoint; rebuild them from each module's config."""
    for module in model.modules():
        buffers = {name: b for name, b in module.named_buffers(recurse=False) if "inv_freq" in name}
        if not buffers:
            continue
        with torch.device("cpu"):
            fresh = type(module)(module.config)
        for name, buf in buffers.items():
            buf.copy_(getattr(fresh, name).to(buf.device, buf.dtype))


def check_keys(model: nn.Module, files: dict[str, Path], where: Path) -> list[str]:
    """Raise unless ``files`` hold exactly the model's keys; a single file may lack what ComfyUI's leave out
    (:data:`COMFYUI_OMITTED`). Returns the keys that are absent."""
    expected = {name: p.shape for name, p in model.state_dict().items()}
    missing = expected.keys() - files.keys()
    absent = sorted(k for k in missing if k.startswith(COMFYUI_OMITTED)) if where.is_file() else []
    missing -= set(absent)
    unexpected = files.keys() - expected.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {listing(missing, 12)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {listing(unexpected, 12)}")
        raise CheckpointError(f"{where} does not match the HiDream-O1 architecture: " + "; ".join(parts))
    return absent


def _peft_base_key(key: str) -> str:
    """Where a checkpoint weight lives once PEFT has wrapped its linear: ``….q_proj.base_layer.weight``."""
    module, name = key.rsplit(".", 1)
    return f"{module}.base_layer.{name}"


def copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (unsharded) tensor into ``target``; a DTensor keeps only its own shard of it."""
    if isinstance(target, DTensor):
        local = distribute_tensor(full.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(local.to_local())
    else:
        target.copy_(full)


@torch.no_grad()
def load_weights(model: nn.Module, files: dict[str, Path], absent: Sequence[str] = ()) -> None:
    """Fill materialised (possibly FSDP-sharded) parameters from safetensors, one tensor at a time; the
    ``absent`` ones (see :func:`check_keys`) are set to zero."""
    targets = model.state_dict()
    for key in absent:
        (targets[key] if key in targets else targets[_peft_base_key(key)]).zero_()
    by_file: dict[Path, list[str]] = defaultdict(list)
    for key, file in files.items():
        by_file[file].append(key)
    for file, keys in sorted(by_file.items()):
        with open_safetensors(file) as f:
            for key in keys:
                target = targets[key] if key in targets else targets[_peft_base_key(key)]
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(target.shape):
                    raise CheckpointError(
                        f"{file.name}: {key} has shape {list(shape)}, the model expects {list(target.shape)}"
                    )
                copy_full_into(target, f.get_tensor(key).to(target.dtype))


def _refuse_reference_images(module: nn.Module, args, kwargs) -> None:
    if kwargs.get("pixel_values") is not None:
        raise CheckpointError(
            "edit / IP generation needs the ViT's DeepStack mergers (model.visual.deepstack_merger_list.*), "
            "which this single-file checkpoint leaves out: load the official HiDream-O1-Image weights instead")


def load_model(
    path: str | Path,
    *,
    weights: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    attention: str = "auto",
    tokenizer=None,
    prepare: Callable[[HiDreamO1], nn.Module] | None = None,
    fill: Callable[[HiDreamO1], None] | None = None,
    lm_head: bool = True,
    base_quantization: str = "none",
) -> nn.Module:
    """Load the official checkpoint at ``path`` with every parameter in ``dtype`` on ``device``.

    ``weights``: one ``.safetensors`` file with the weights instead of ``path``'s (which then needs only its
    config, tokenizer and processor files), e.g. a ComfyUI single-file checkpoint. Such a file may lack
    ``lm_head`` (set to zero: image generation never uses it) and the DeepStack mergers (set to zero, and
    edit / IP inputs are then refused with a :class:`CheckpointError`).

    ``prepare`` runs on the meta model before any memory is allocated (LoRA injection, FSDP sharding); its
    return value (e.g. the PEFT wrapper) is what this function returns. ``fill`` replaces the weight files
    (which then need not exist): it sets the materialised parameters itself, e.g. to random values for a
    benchmark. Raises :class:`CheckpointError` naming missing/unexpected keys or mismatched shapes.

    ``lm_head=False``: the LM head is neither built nor read. ``base_quantization`` ("nf4", "fp8"): the decoder's
    linears are quantized (:mod:`hidream_ft.model.quantize`); they need their real weights for that, so such a
    model is materialised and filled in full on ``device`` before ``prepare`` sees it.
    """
    path = Path(path)
    config = load_hf_config(path)
    tokenizer = tokenizer or load_tokenizer(path)
    tokens = SpecialTokens.from_tokenizer(tokenizer, config)
    model = build_meta_model(config, tokens.tms, attention, lm_head)
    if fill is None:
        source = Path(weights) if weights is not None else path
        if weights is not None and not (source.is_file() and source.suffix == ".safetensors"):
            raise CheckpointError(f"{source}: the weights must be one .safetensors file")
        files = weight_files(source)
        if not lm_head:
            files = {key: file for key, file in files.items() if not key.startswith(LM_HEAD)}
        absent = check_keys(model, files, source)
        if any(key.startswith(COMFYUI_OMITTED[1]) for key in absent):
            model.register_forward_pre_hook(_refuse_reference_images, with_kwargs=True)
        fill = functools.partial(load_weights, files=files, absent=absent)
    model.to(dtype)
    if base_quantization == "none":  # else LoRA injection and sharding wait for the quantized weights
        prepared = prepare(model) if prepare is not None else model
    model.to_empty(device=device)
    fill(model)
    restore_rotary_buffers(model)
    if base_quantization != "none":
        quantize_decoder_linears(model, base_quantization)
        prepared = prepare(model) if prepare is not None else model
    return prepared
