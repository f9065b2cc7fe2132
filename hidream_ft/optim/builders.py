"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from hidream_ft.config import OptimConfig
from hidream_ft.optim.adamw8bit import ShardedAdamW8bit


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup to 1, then constant or cosine decay to ``min_ratio`` at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        # Fused (CPU and CUDA) so that the step honours ``optimizer.found_inf``: the trainer skips a
        # non-finite step on the device, without reading the loss on the host.
        return torch.optim.AdamW(params, fused=True, **kwargs)
    optimizer = ShardedAdamW8bit(params, **kwargs, stochastic_rounding=cfg.stochastic_rounding)
    if cfg.fused_backward:
        optimizer.attach_to_backward()
    return optimizer


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, cfg.warmup_steps, total_steps, cfg.schedule, cfg.min_lr_ratio),
    )
