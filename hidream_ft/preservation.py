"""LoRA prior preservation: on the noisy images of a training micro-batch, with a preservation prompt in place of
each caption, the adapted model's prediction is pulled towards the base model's (the adapter disabled), so
that the adapter leaves what the base model does for those prompts alone (docs/quality.md)."""

from __future__ import annotations

from pathlib import Path

import torch

from hidream_ft.config import ConfigError, DiffusionConfig, PreservationConfig
from hidream_ft.data.collate import TrainBatch
from hidream_ft.flow.objective import diffusion_loss, model_timestep
from hidream_ft.model.reference_layout import generation_inputs


def preservation_prompts(cfg: PreservationConfig) -> list[str]:
    """``prompts`` followed by the non-blank lines of ``prompts_file``."""
    if not cfg.prompts_file:
        return list(cfg.prompts)
    path = Path(cfg.prompts_file).expanduser()
    if not path.is_file():
        raise ConfigError(f"preservation.prompts_file: {cfg.prompts_file!r} is not a file")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"preservation.prompts_file: {cfg.prompts_file!r} holds no prompt")
    return [*cfg.prompts, *lines]


def preservation_loss(model, batch: TrainBatch, diffusion: DiffusionConfig) -> torch.Tensor:
    """MSE between the adapted and the base prediction of the batch's noisy target (the same σ and ε as its
    diffusion loss) under its preservation prompts. ``model``: the PEFT model; the base prediction runs without
    autograd, with every adapter disabled (``disable_adapter`` switches a flag that every adapter kind reads in
    its forward; no weight changes)."""
    z, sigmas, output = batch.noised(diffusion)
    inputs = {**generation_inputs(batch.preservation_layout, z, batch.conditions),
              "timestep": model_timestep(sigmas), **output}
    with torch.no_grad(), model.disable_adapter():
        base = model(**inputs)
    return diffusion_loss(model(**inputs), base, sigmas, token_counts=batch.packed_target_counts)
