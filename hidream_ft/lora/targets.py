"""What trains: PEFT LoRA targets, or the parameter set of a full fine-tune."""

from __future__ import annotations

import zlib

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from hidream_ft.config import FullConfig, LoraConfig

DECODER_LINEARS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
HEAD_LINEARS = {
    "x_embedder": ["x_embedder.proj1", "x_embedder.proj2"],
    "t_embedder1": ["t_embedder1.mlp.0", "t_embedder1.mlp.2"],
    "final_layer2": ["final_layer2.linear"],
}
VISUAL_LINEARS = r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear_fc[12])"


def lora_target_regex(cfg: LoraConfig) -> str:
    """A PEFT ``target_modules`` regex (matched against full module names) for the configured targets."""
    unknown = [t for t in cfg.targets if t not in DECODER_LINEARS]
    if unknown:
        raise ValueError(f"lora.targets: unknown module {unknown[0]!r}; choose from {', '.join(DECODER_LINEARS)}")
    bad_heads = [h for h in cfg.train_heads if h not in HEAD_LINEARS]
    if bad_heads:
        raise ValueError(f"lora.train_heads: unknown head {bad_heads[0]!r}; choose from {', '.join(HEAD_LINEARS)}")
    groups = {}
    for name in cfg.targets:
        groups.setdefault(DECODER_LINEARS[name], []).append(name)
    decoder = "|".join(f"{parent}\\.({'|'.join(names)})" for parent, names in groups.items())
    alternatives = [rf"model\.language_model\.layers\.\d+\.({decoder})"] if decoder else []
    alternatives += [rf"model\.{p.replace('.', chr(92) + '.')}" for h in cfg.train_heads for p in HEAD_LINEARS[h]]
    if cfg.include_visual:
        alternatives.append(VISUAL_LINEARS)
    if not alternatives:
        raise ValueError("lora: no targets configured (lora.targets, lora.train_heads, lora.include_visual)")
    return "^(" + "|".join(alternatives) + ")$"


def peft_lora_config(cfg: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        use_rslora=cfg.use_rslora,
        target_modules=lora_target_regex(cfg),
        init_lora_weights=True,
    )


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap ``model`` in a PEFT LoRA model; adapter weights are created on the base weights' device (meta ok)."""
    for param in model.parameters():
        param.requires_grad_(False)
    return get_peft_model(model, peft_lora_config(cfg), low_cpu_mem_usage=True)


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
            _copy_into(weight, full)
            module.lora_B[adapter].weight.zero_()


def _copy_into(param: torch.Tensor, full: torch.Tensor) -> None:
    if isinstance(param, DTensor):
        local = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full)


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
