"""What trains: PEFT adapter targets (any :data:`~hidream_ft.lora.keys.KINDS`) and their deterministic init,
or the parameter set of a full fine-tune."""

from __future__ import annotations

import warnings
import zlib

import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lycoris_utils import LycorisLayer
from peft.utils.integrations import dequantize_module_weight
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

from hidream_ft.config import ConfigError, FullConfig, LoraConfig
from hidream_ft.lora import let_peft_see_bitsandbytes, peft_without_torchao
from hidream_ft.lora.adapter import peft_lora_config
from hidream_ft.lora.keys import SLOT, module_regex
from hidream_ft.model.loading import copy_full_into
from hidream_ft.model.quantize import DECODER_LINEARS

HEAD_LINEARS = {
    "x_embedder": ["x_embedder.proj1", "x_embedder.proj2"],
    "t_embedder1": ["t_embedder1.mlp.0", "t_embedder1.mlp.2"],
    "final_layer2": ["final_layer2.linear"],
}
VISUAL_LINEARS = ["attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2"]


def lora_target_regex(cfg: LoraConfig) -> str:
    """A PEFT ``target_modules`` regex (matched against full module names) for the configured targets."""
    unknown = [t for t in cfg.targets if t not in DECODER_LINEARS]
    if unknown:
        raise ConfigError(f"lora.targets: unknown module {unknown[0]!r}; choose from {', '.join(DECODER_LINEARS)}")
    bad_heads = [h for h in cfg.train_heads if h not in HEAD_LINEARS]
    if bad_heads:
        raise ConfigError(f"lora.train_heads: unknown head {bad_heads[0]!r}; choose from {', '.join(HEAD_LINEARS)}")
    paths = [f"model.language_model.layers.{SLOT}.{DECODER_LINEARS[name]}.{name}" for name in cfg.targets]
    paths += [f"model.{path}" for head in cfg.train_heads for path in HEAD_LINEARS[head]]
    if cfg.include_visual:
        paths += [f"model.visual.blocks.{SLOT}.{linear}" for linear in VISUAL_LINEARS]
    if not paths:
        raise ConfigError("lora: no targets configured (lora.targets, lora.train_heads, lora.include_visual)")
    return module_regex(paths)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap ``model`` in a PEFT model with ``cfg.kind`` adapters; their weights are created on the base weights'
    device (meta ok) and set by :func:`init_lora_weights` once the base weights are loaded.

    Over a quantized base (:mod:`hidream_ft.model.quantize`, loaded already) PEFT's own LoRA layers for
    bitsandbytes 4-bit and torchao linears wrap the quantized ones; the adapter's keys and shapes are those of
    an unquantized base, so it applies to the full-precision model."""
    for param in model.parameters():
        param.requires_grad_(False)
    config = peft_lora_config(cfg.rank, cfg.alpha, kind=cfg.kind, use_rslora=cfg.use_rslora,
                              target_modules=lora_target_regex(cfg), dropout=cfg.dropout,
                              lokr_factor=cfg.lokr_factor, lokr_decompose_both=cfg.lokr_decompose_both)
    quantized = {getattr(m, "base_quantization", None) for m in model.modules()}
    if "nf4" in quantized:
        let_peft_see_bitsandbytes()
        model.is_loaded_in_4bit = True  # what PEFT asks before it picks its 4-bit layer
    on_meta = any(p.is_meta for p in model.parameters())
    with warnings.catch_warnings(), peft_without_torchao():
        # Training never merges into the quantized weights (exports go onto the full-precision base), which
        # is all that PEFT's torchao layer warns about.
        warnings.filterwarnings("ignore", message=".*without `get_apply_tensor_subclass`")
        return get_peft_model(model, config, low_cpu_mem_usage=on_meta)


# PEFT's own init of each adapter tensor, so that the adapter starts as ΔW = 0: "kaiming" is
# kaiming_uniform_(a=√5), i.e. uniform in ±1/√fan_in. DoRA's magnitude is set from the base weight instead.
INITS = {
    "lora_A": "kaiming", "lora_B": "zeros",
    "hada_w1_a": "kaiming", "hada_w1_b": "kaiming", "hada_w2_a": "kaiming", "hada_w2_b": "zeros",
    "lokr_w1": "zeros", "lokr_w1_a": "zeros", "lokr_w1_b": "kaiming",
    "lokr_w2": "kaiming", "lokr_w2_a": "kaiming", "lokr_w2_b": "kaiming",
}


def _adapter_tensors(module: nn.Module):
    """(name, adapter, tensor) of every adapter parameter of a PEFT layer."""
    for name in INITS:
        for adapter, held in getattr(module, name, {}).items():
            yield name, adapter, held.weight if isinstance(held, nn.Module) else held


@torch.no_grad()
def init_lora_weights(model: nn.Module, seed: int) -> None:
    """Deterministic adapter init, identical for any world size, as PEFT's (:data:`INITS`); a DoRA magnitude
    is the norm of each base weight row, so the adapter starts as ΔW = 0 as well.

    Each random tensor is drawn in full from a generator keyed by (seed, parameter name) and then sharded,
    so a run on one rank and a run on eight start from exactly the same adapter.
    """
    for module_name, module in model.named_modules():
        if not isinstance(module, (LoraLayer, LycorisLayer)):
            continue
        for name, adapter, tensor in _adapter_tensors(module):
            if INITS[name] == "zeros":
                tensor.zero_()
                continue
            # A LoRA's A keeps the stream it has always been drawn from.
            # Keyed by the layer's checkpoint name, so that wrapping for activation checkpointing (which
            # inserts a module level) does not change the adapter a run starts from.
            layer_name = module_name.replace(_CHECKPOINT_PREFIX, "")
            stream = layer_name if name == "lora_A" else f"{layer_name}.{name}"
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(stream.encode()))
            full = torch.empty(tensor.shape, dtype=torch.float32)
            bound = 1.0 / full.shape[1] ** 0.5
            full.uniform_(-bound, bound, generator=generator)
            copy_full_into(tensor, full)
        for magnitude in getattr(module, "lora_magnitude_vector", {}).values():
            weight = dequantize_module_weight(module.get_base_layer())  # as is, unless a quantized base
            weight = weight.full_tensor() if isinstance(weight, DTensor) else weight
            copy_full_into(magnitude.weight, torch.linalg.vector_norm(weight.float(), dim=1))


def set_full_trainable(model: nn.Module, cfg: FullConfig, frozen_dtype: torch.dtype | None = None) -> None:
    """Full fine-tune: the decoder and the HiDream heads; ViT, lm_head (when built) and the embedding table per
    config. The frozen parameters are cast to ``frozen_dtype`` (None: kept as they are; meta ok)."""
    backbone = model.model
    for param in model.parameters():
        param.requires_grad_(True)
    frozen = []
    if not cfg.train_visual:
        frozen.append(backbone.visual)
    if not cfg.train_lm_head and model.lm_head is not None:
        frozen.append(model.lm_head)
    if not cfg.train_embed_tokens:
        frozen.append(backbone.language_model.embed_tokens)
    for module in frozen:
        for param in module.parameters():
            param.requires_grad_(False)
            if frozen_dtype is not None:
                param.data = param.data.to(frozen_dtype)
