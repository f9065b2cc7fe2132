"""Validation images during training: render on every rank, log on rank 0.

With an FSDP-sharded model every forward is a collective (parameters are all-gathered layer by layer), so
:func:`render_validation` must be called on **all** ranks with identical arguments: it draws its noise from
its own CPU generators (never the global RNG, never rank-dependent), so every rank runs exactly the same
sequence of forwards. Only rank 0, which owns the SummaryWriter, then calls :func:`log_validation`.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from hidream_ft.config import ValidationConfig
from hidream_ft.inference.pipeline import generate
from hidream_ft.config.sampling import SamplingSettings
from hidream_ft.model.layout import SpecialTokens

TAG_PREFIX = "validation"


def render_validation(
    model: nn.Module, tokenizer, tokens: SpecialTokens, cfg: ValidationConfig, device: torch.device | str
) -> list[tuple[str, torch.Tensor]]:
    """(prompt, uint8 [3, H, W] CPU image) for every ``cfg.prompts`` entry, in order.

    Runs in eval mode under ``torch.no_grad`` and restores every submodule's train/eval flag afterwards;
    the caller's RNG state is untouched, so training continues exactly as without validation.
    """
    settings = SamplingSettings.from_fields(cfg)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        return [(prompt, generate(model, tokenizer, tokens, prompt, settings, device)) for prompt in cfg.prompts]
    finally:
        for module, training in modes.items():
            module.training = training


def image_tag(index: int, prompt: str) -> str:
    """``validation/03_a_red_fox_in_the_snow``: ordered by index, readable, TensorBoard-safe."""
    slug = re.sub(r"[^0-9A-Za-z]+", "_", prompt).strip("_")[:48].rstrip("_")
    return f"{TAG_PREFIX}/{index:02d}_{slug}" if slug else f"{TAG_PREFIX}/{index:02d}"


def log_validation(writer, step: int, images: list[tuple[str, torch.Tensor]]) -> None:
    """Write each image under :func:`image_tag` at ``step`` (``writer``: a torch SummaryWriter)."""
    for index, (prompt, image) in enumerate(images):
        writer.add_image(image_tag(index, prompt), image, global_step=step, dataformats="CHW")
    writer.flush()
