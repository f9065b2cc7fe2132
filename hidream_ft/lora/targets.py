"""What trains: PEFT LoRA targets, or the parameter set of a full fine-tune."""

from __future__ import annotations

import zlib

import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from hidream_ft.config import ConfigError, FullConfig, LoraConfig
from hidream_ft.lora.adapter import peft_lora_config
from hidream_ft.lora.keys import SLOT, module_regex
from hidream_ft.model.loading import copy_full_into

DECODER_LINEARS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
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
    """Wrap ``model`` in a PEFT LoRA model; adapter weights are created on the base weights' device (meta ok)."""
    for param in model.parameters():
        param.requires_grad_(False)
    config = peft_lora_config(cfg.rank, cfg.alpha, use_rslora=cfg.use_rslora, target_modules=lora_target_regex(cfg),
                              dropout=cfg.dropout)
    return get_peft_model(model, config, low_cpu_mem_usage=True)


@torch.no_grad()
def init_lora_weights(model: nn.Module, seed: int) -> None:
    """Deterministic LoRA init, identical for any world size: A ~ PEFT's kaiming-uniform, B = 0.

    Each A is drawn in full from a generator keyed by (seed, parameter name) and then sharded, so a run on
    one rank and a run on eight start from exactly the same adapter.
    """
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter, lora_a in module.lora_A.items():
            weight = lora_a.weight
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(module_name.encode()))
            full = torch.empty(weight.shape, dtype=torch.float32)
            bound = 1.0 / full.shape[1] ** 0.5  # kaiming_uniform_(a=√5) on a [r, in] matrix
            full.uniform_(-bound, bound, generator=generator)
            copy_full_into(weight, full)
            module.lora_B[adapter].weight.zero_()


def set_full_trainable(model: nn.Module, cfg: FullConfig) -> None:
    """Full fine-tune: the decoder and the HiDream heads; ViT, lm_head and the embedding table per config."""
    backbone = model.model
    for param in model.parameters():
        param.requires_grad_(True)
    frozen = []
    if not cfg.train_visual:
        frozen.append(backbone.visual)
    if not cfg.train_lm_head:
        frozen.append(model.lm_head)
    if not cfg.train_embed_tokens:
        frozen.append(backbone.language_model.embed_tokens)
    for module in frozen:
        for param in module.parameters():
            param.requires_grad_(False)
