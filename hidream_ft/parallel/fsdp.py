"""FSDP2 sharding, activation checkpointing and per-layer compile, applied to the model from outside
(the units are listed in docs/architecture.md)."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from hidream_ft.config import ParallelConfig
from hidream_ft.model.dtypes import TORCH_DTYPES


def checkpointed_layer_indices(cfg: ParallelConfig, num_layers: int) -> list[int]:
    if cfg.activation_checkpointing == "none":
        return []
    if cfg.activation_checkpointing == "full":
        return list(range(num_layers))
    return list(range(0, num_layers, cfg.ac_every))


def apply_activation_checkpointing(layers: nn.ModuleList, cfg: ParallelConfig) -> None:
    for index in checkpointed_layer_indices(cfg, len(layers)):
        layers[index] = checkpoint_wrapper(layers[index], preserve_rng_state=True)


def apply_compile(layers: nn.ModuleList) -> None:
    """Compile each decoder layer separately: fuses norms, RoPE and SiLU without a whole-graph compile."""
    for layer in layers:
        layer.compile(dynamic=False)


def parallelize(model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh) -> None:
    """Shard a HiDreamO1 (optionally PEFT-injected, possibly still on ``meta``) in place."""
    policy = MixedPrecisionPolicy(param_dtype=TORCH_DTYPES[cfg.param_dtype],
                                  reduce_dtype=TORCH_DTYPES[cfg.reduce_dtype])
    shard = dict(mesh=mesh, mp_policy=policy)
    backbone = model.model
    layers = backbone.language_model.layers
    apply_activation_checkpointing(layers, cfg)
    if cfg.compile:
        apply_compile(layers)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=cfg.reshard_after_forward, **shard)
    visual = backbone.visual
    if any(p.requires_grad for p in visual.parameters()):
        for block in visual.blocks:
            fully_shard(block, **shard)
    fully_shard(visual, **shard)
    fully_shard(backbone.language_model.embed_tokens, **shard)
    fully_shard(model.lm_head, **shard)
    fully_shard(model, reshard_after_forward=False, **shard)
