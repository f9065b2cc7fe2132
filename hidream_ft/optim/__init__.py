"""Optimizers (AdamW, 8-bit AdamW on FSDP2 shards) and learning-rate schedules."""

from hidream_ft.optim.builders import build_optimizer, build_scheduler, lr_multiplier

__all__ = ["build_optimizer", "build_scheduler", "lr_multiplier"]
