"""FSDP2 sharding, activation checkpointing and per-layer compile, applied to the model from outside
(the units are listed in docs/architecture.md)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.utils.checkpoint import create_selective_checkpoint_contexts

from hidream_ft.config import ParallelConfig
from hidream_ft.model.dtypes import TORCH_DTYPES
from hidream_ft.model.quantize import quantized_parameters


def checkpointed_layer_indices(cfg: ParallelConfig, num_layers: int) -> list[int]:
    if cfg.activation_checkpointing == "none":
        return []
    if cfg.activation_checkpointing == "selective":
        return list(range(0, num_layers, cfg.ac_every))
    return list(range(num_layers))  # "full" and "op"


def _saved_by_op_level_ac() -> list:
    """The ops whose outputs ``op`` checkpointing keeps: matmuls and attention kernels (the FLOPs); everything
    else (norms, RoPE, SiLU · mul, casts, adds) is recomputed in the backward pass."""
    aten = torch.ops.aten
    ops = [aten.mm.default, aten.addmm.default, aten.bmm.default,
           aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
           aten._scaled_dot_product_cudnn_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default]
    return [*ops, torch._higher_order_ops.flex_attention]


def apply_activation_checkpointing(layers: nn.ModuleList, cfg: ParallelConfig) -> None:
    options = {}
    if cfg.activation_checkpointing == "op":
        options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _saved_by_op_level_ac())
    for index in checkpointed_layer_indices(cfg, len(layers)):
        layers[index] = checkpoint_wrapper(layers[index], preserve_rng_state=True, **options)


def compile_enabled(setting: bool | str, device_type: str) -> bool:
    """``parallel.compile``: "auto" compiles on CUDA only (on CPU compiling costs more than it saves)."""
    return device_type == "cuda" if setting == "auto" else bool(setting)


def apply_compile(layers: nn.ModuleList, backend: str | Callable = "inductor") -> None:
    """Compile each decoder layer separately: fuses norms, RoPE and SiLU without a whole-graph compile.

    The layers share their graphs. Dynamo's automatic dynamic shapes make a size symbolic the first time it
    changes, so the second caption length (or bucket, or batch size) recompiles once and later ones reuse that
    graph. ``dynamic=True`` is not used: it would make the head counts symbolic too, which SDPA's ``enable_gqa``
    flag cannot take. ``fullgraph`` turns a graph break into an error, and reaching dynamo's recompile limit
    raises instead of silently running the layer eagerly (that switch is process-wide).
    """
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    for layer in layers:
        # The forward only, not the module call: FSDP's hooks around it stay eager.
        layer.forward = torch.compile(layer.forward, backend=backend, fullgraph=True)


def offload_policy(cfg: ParallelConfig) -> OffloadPolicy:
    """``parallel.offload``: "cpu" keeps every FSDP-managed parameter, gradient and optimizer state on the CPU
    (pinned where there is a GPU to copy to)."""
    if cfg.offload == "cpu":
        return CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    return OffloadPolicy()


def parallelize(model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh) -> None:
    """Shard a HiDreamO1 (optionally PEFT-injected, possibly still on ``meta``) in place. The linears of a
    quantized base are left out (replicated: every rank holds them whole); their LoRA weights are sharded.
    A frozen ViT is never sharded: every rank holds it whole, in ``param_dtype``. On a one-rank mesh (without
    CPU offload, which FSDP implements) nothing is sharded: see :func:`compute_in`."""
    compute_dtype = TORCH_DTYPES[cfg.param_dtype]
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=TORCH_DTYPES[cfg.reduce_dtype])
    backbone = model.model
    layers = backbone.language_model.layers
    apply_activation_checkpointing(layers, cfg)
    if compile_enabled(cfg.compile, mesh.device_type):
        apply_compile(layers)
    visual = backbone.visual
    vision_trains = any(p.requires_grad for p in visual.parameters())
    if not vision_trains:  # what FSDP would gather it as; no master copy is needed for frozen weights
        visual.to(compute_dtype)
    if mesh.size() == 1 and cfg.offload == "none":
        compute_in(model, compute_dtype, mesh.device_type)
        return
    frozen_vision = set() if vision_trains else set(visual.parameters())
    shard = dict(mesh=mesh, mp_policy=policy, offload_policy=offload_policy(cfg),
                 ignored_params=quantized_parameters(model) | frozen_vision)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=cfg.reshard_after_forward, **shard)
    if vision_trains:
        for block in visual.blocks:
            fully_shard(block, **shard)
        fully_shard(visual, **shard)
    fully_shard(backbone.language_model.embed_tokens, **shard)
    if model.lm_head is not None:
        fully_shard(model.lm_head, **shard)
    fully_shard(model, reshard_after_forward=False, **shard)


def compute_in(model: nn.Module, dtype: torch.dtype, device_type: str) -> None:
    """Mixed precision for an unsharded model: its forward runs under autocast to ``dtype`` (matmuls in
    ``dtype`` from the master weights, which keep their own dtype), unless ``dtype`` is float32."""
    if dtype != torch.float32:
        model.forward = torch.autocast(device_type, dtype=dtype)(model.forward)
