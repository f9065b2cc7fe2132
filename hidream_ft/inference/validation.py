"""Validation images during training: :func:`render_validation` on every rank with identical arguments (an
FSDP forward is a collective), :func:`log_validation` on rank 0 (docs/sampling.md)."""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn

from hidream_ft.config import ValidationConfig
from hidream_ft.inference.pipeline import generate
from hidream_ft.model.layout import SpecialTokens

TAG_PREFIX = "validation"


@contextmanager
def evaluating(model: nn.Module):
    """``model`` in eval mode for the block, then every submodule's train/eval flag as it was."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def render_validation(
    model: nn.Module, tokenizer, tokens: SpecialTokens, cfg: ValidationConfig, device: torch.device | str
) -> list[tuple[str, torch.Tensor]]:
    """(prompt, uint8 [3, H, W] CPU image) for every ``cfg.prompts`` entry, in order.

    Runs in eval mode under ``torch.no_grad`` and restores every submodule's train/eval flag afterwards;
    the caller's RNG state is untouched, so training continues exactly as without validation.
    """
    with evaluating(model):
        return [(prompt, generate(model, tokenizer, tokens, prompt, cfg, device)) for prompt in cfg.prompts]


def image_tag(index: int, prompt: str) -> str:
    """``validation/03_a_red_fox_in_the_snow``: ordered by index, readable, TensorBoard-safe."""
    slug = re.sub(r"[^0-9A-Za-z]+", "_", prompt).strip("_")[:48].rstrip("_")
    return f"{TAG_PREFIX}/{index:02d}_{slug}" if slug else f"{TAG_PREFIX}/{index:02d}"


def log_validation(writer, step: int, images: list[tuple[str, torch.Tensor]]) -> None:
    """Write each image under :func:`image_tag` at ``step`` (``writer``: a torch SummaryWriter, or the trainer's
    MetricsLogger, which forwards them to tensorboard and wandb)."""
    for index, (prompt, image) in enumerate(images):
        writer.add_image(image_tag(index, prompt), image, global_step=step, dataformats="CHW")
    writer.flush()
