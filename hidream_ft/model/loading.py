"""Load HiDream-O1-Image from a directory in the official Hugging Face layout.

    config.json, model.safetensors.index.json + model-0000x-of-0000y.safetensors (or model.safetensors),
    tokenizer files (tokenizer.json, tokenizer_config.json, chat template), preprocessor_config.json

The model is built on the ``meta`` device, optionally sharded by a caller-supplied function (FSDP), then
materialised and filled tensor by tensor from the memory-mapped safetensors files, so no process ever holds
more than its own shard plus one full tensor.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import AutoTokenizer, Qwen3VLConfig

from hidream_ft.model.hidream import HiDreamO1, rope_parameters
from hidream_ft.model.layout import SpecialTokens

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """The checkpoint directory does not hold a loadable HiDream-O1 model."""


def _listing(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


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
    """checkpoint key → the safetensors file that holds it, from the index (or the single file)."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = {key: path / name for key, name in weight_map.items()}
        missing = sorted({str(f) for f in files.values() if not f.is_file()})
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {_listing(missing)}")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        with safe_open(single, "pt") as f:
            return {key: single for key in f.keys()}
    raise CheckpointError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")


def build_meta_model(config: Qwen3VLConfig, tms_token_id: int, attention: str = "split") -> HiDreamO1:
    with torch.device("meta"):
        return HiDreamO1(config, tms_token_id=tms_token_id, attention=attention)


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


def check_keys(model: nn.Module, files: dict[str, Path], where: Path) -> None:
    expected = {name: p.shape for name, p in model.state_dict().items()}
    missing = expected.keys() - files.keys()
    unexpected = files.keys() - expected.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
        raise CheckpointError(f"{where} does not match the HiDream-O1 architecture: " + "; ".join(parts))


def _peft_base_key(key: str) -> str:
    """Where a checkpoint weight lives once PEFT has wrapped its linear: ``….q_proj.base_layer.weight``."""
    module, name = key.rsplit(".", 1)
    return f"{module}.base_layer.{name}"


@torch.no_grad()
def load_weights(model: nn.Module, files: dict[str, Path]) -> None:
    """Fill materialised (possibly FSDP-sharded) parameters from safetensors, one tensor at a time."""
    targets = model.state_dict()
    by_file: dict[Path, list[str]] = defaultdict(list)
    for key, file in files.items():
        by_file[file].append(key)
    for file, keys in sorted(by_file.items()):
        with safe_open(file, "pt", device="cpu") as f:
            for key in keys:
                target = targets[key] if key in targets else targets[_peft_base_key(key)]
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(target.shape):
                    raise CheckpointError(
                        f"{file.name}: {key} has shape {list(shape)}, the model expects {list(target.shape)}"
                    )
                full = f.get_tensor(key).to(target.dtype)
                if isinstance(target, DTensor):
                    local = distribute_tensor(
                        full.to(target.device), target.device_mesh, target.placements, src_data_rank=None
                    )
                    target.to_local().copy_(local.to_local())
                else:
                    target.copy_(full)


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    attention: str = "split",
    tokenizer=None,
    prepare: Callable[[HiDreamO1], nn.Module] | None = None,
) -> nn.Module:
    """Load the official checkpoint at ``path`` with every parameter in ``dtype`` on ``device``.

    ``prepare`` runs on the meta model before any memory is allocated (LoRA injection, FSDP sharding); its
    return value (e.g. the PEFT wrapper) is what this function returns. Raises :class:`CheckpointError`
    naming missing/unexpected keys or mismatched shapes.
    """
    path = Path(path)
    config = load_hf_config(path)
    tokenizer = tokenizer or load_tokenizer(path)
    tokens = SpecialTokens.from_tokenizer(tokenizer, config)
    files = weight_files(path)
    model = build_meta_model(config, tokens.tms, attention)
    check_keys(model, files, path)
    model.to(dtype)
    prepared = prepare(model) if prepare is not None else model
    model.to_empty(device=device)
    load_weights(model, files)
    restore_rotary_buffers(model)
    return prepared
