"""What the converters read: training outputs, other tools' LoRA files and full fine-tune weights.

    run dir       <logging.output_dir>/ — its adapter/ if present, else the newest complete checkpoint
    step dir      checkpoints/step-00000100/ — an adapter (of its kind) or a full fine-tune, as meta.json says
    PEFT dir      adapter_config.json + adapter_model.safetensors (the trainer's final adapter/)
    .safetensors  a LoRA in any known key style, or a full state dict under the official model keys

With ``ema``, the averaged weights an ``ema.enabled`` run kept are read instead: a run dir's ``adapter-ema/``,
else its newest checkpoint's EMA; a step dir's EMA. Other sources hold no average and are refused.

Provenance (base model, steps, trigger phrase, targets) is taken from meta.json, adapter_config.json and the
run's resolved config.toml, and travels into the headers of every exported file.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hidream_ft.lora import (
    ConvertError, LoraAdapter, adapter_from_peft_state, peft_lora_config, read_lora_file, read_peft_dir,
)
from hidream_ft.lora.formats import META, PEFT_CONFIG
from hidream_ft.lora.keys import is_lora_key
from hidream_ft.model.safetensors_io import open_safetensors
from hidream_ft.optim.ema import EMA_ADAPTER_DIR

RUN_CONFIG = "config.toml"
MODEL_KEY_ROOTS = ("model.", "lm_head.")  # a state dict under the official keys: full weights, not a LoRA
STEP_META = "meta.json"


class TensorSource:
    """Named tensors read one at a time: a state dict in memory or a memory-mapped safetensors file."""

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, file: Path | None = None):
        self._tensors = tensors
        self._file = open_safetensors(file) if file is not None else None
        self._keys = list(tensors) if tensors is not None else list(self._file.keys())
        self._key_set = set(self._keys)
        self.where = str(file) if file is not None else "the fine-tuned checkpoint"

    def keys(self) -> list[str]:
        return self._keys

    def __contains__(self, key: str) -> bool:
        return key in self._key_set

    def shape(self, key: str) -> tuple[int, ...]:
        if self._tensors is not None:
            return tuple(self._tensors[key].shape)
        return tuple(self._file.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key] if self._tensors is not None else self._file.get_tensor(key)


@dataclass
class FullWeights:
    """A full fine-tune: tensors under the official model keys that replace the base model's."""

    tensors: TensorSource
    metadata: dict[str, str] = field(default_factory=dict)


def _run_info(run_dir: Path) -> dict[str, str]:
    """Provenance from the run's resolved config.toml, when there is one."""
    config_file = run_dir / RUN_CONFIG
    if not config_file.is_file():
        return {}
    try:
        config = tomllib.loads(config_file.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConvertError(f"{config_file}: invalid TOML: {e}") from None
    info = {
        "base_model": config.get("model", {}).get("path"),
        "training_steps": config.get("train", {}).get("max_steps"),
        "trigger": config.get("data", {}).get("trigger"),
    }
    return {META + k: str(v) for k, v in info.items() if v not in (None, "")}


def _read_step_dir(step_dir: Path, ema: bool) -> LoraAdapter | FullWeights:
    from hidream_ft.runtime.checkpoint import EMA_WEIGHTS, load_model_state

    try:
        meta = json.loads((step_dir / STEP_META).read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{step_dir / STEP_META}: invalid JSON: {e}") from None
    try:
        state = load_model_state(step_dir, EMA_WEIGHTS if ema else "model")
    except FileNotFoundError as e:
        raise ConvertError(str(e)) from None
    info = _run_info(step_dir.parent.parent)
    info[META + "training_steps"] = str(meta.get("step", ""))
    if meta.get("model_path"):
        info[META + "base_model"] = str(meta["model_path"])
    mode = meta.get("mode")
    if ema:
        info[META + "ema"] = "true"
    if mode == "full":
        return FullWeights(TensorSource(state), info)
    if mode != "lora":
        raise ConvertError(f"{step_dir / STEP_META}: mode is {mode!r}, expected 'lora' or 'full'")
    lora = meta.get("lora") or {}
    if "alpha" not in lora:
        raise ConvertError(f"{step_dir / STEP_META}: LoRA checkpoint without lora.alpha")
    # A checkpoint from before adapter kinds existed is a plain LoRA.
    config = peft_lora_config(lora.get("rank", 1), lora["alpha"], kind=lora.get("kind", "lora"),
                              use_rslora=lora.get("use_rslora", False), target_modules=lora.get("target_modules"),
                              lokr_factor=lora.get("lokr_factor", -1),
                              lokr_decompose_both=lora.get("lokr_decompose_both", False)).to_dict()
    adapter = adapter_from_peft_state(state, config, str(step_dir))
    adapter.metadata = {**adapter.metadata, **info}
    return adapter


def load_source(path: str | Path, ema: bool = False) -> LoraAdapter | FullWeights:
    """Read any supported input (see the module docstring); with ``ema``, its averaged weights."""
    from hidream_ft.runtime.checkpoint import complete_checkpoints

    path = Path(path)
    if ema and not (path / STEP_META).is_file() and not (path / "checkpoints").is_dir():
        raise ConvertError(f"{path}: --ema reads a training run directory or a checkpoints/step-N folder; this "
                           "source holds no EMA weights")
    if path.is_file():
        if path.suffix == ".safetensors":
            with open_safetensors(path) as f:
                keys = list(f.keys())
            if keys and all(k.startswith(MODEL_KEY_ROOTS) and not is_lora_key(k) for k in keys):
                return FullWeights(TensorSource(file=path))
        return read_lora_file(path)
    if not path.is_dir():
        raise ConvertError(f"{path}: no such file or directory")
    if (path / PEFT_CONFIG).is_file():
        adapter = read_peft_dir(path)
        adapter.metadata = {**_run_info(path.parent), **adapter.metadata}
        return adapter
    if (path / STEP_META).is_file():
        return _read_step_dir(path, ema)
    adapter = path / (EMA_ADAPTER_DIR if ema else "adapter")
    if (adapter / PEFT_CONFIG).is_file():
        return load_source(adapter)
    checkpoints = complete_checkpoints(path / "checkpoints")
    if checkpoints:
        return load_source(checkpoints[-1], ema)
    raise ConvertError(f"{path}: not a training run, checkpoint, PEFT adapter directory or .safetensors file")


def load_adapter(path: str | Path, ema: bool = False) -> LoraAdapter:
    source = load_source(path, ema)
    if isinstance(source, FullWeights):
        raise ConvertError(f"{path} holds full model weights, not a LoRA; merge it with `merge` instead")
    return source
