"""Held-out loss: the x0 loss of a model on fixed batches, at a fixed grid of σ, with fixed noise per (sample, σ),
reduced exactly, so that the number compares across steps, runs and world sizes (docs/quality.md).

Call :func:`heldout_loss` on every rank with identical arguments (an FSDP forward is a collective); every rank
gets the same result. ``model`` is any module with HiDreamO1's forward (the trainer's, a PEFT wrapper, EMA
weights, a merged checkpoint)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from hidream_ft.data.collate import TrainBatch
from hidream_ft.data.samples import rng_for
from hidream_ft.flow.noise import NOISE_SCALE
from hidream_ft.flow.objective import add_noise, diffusion_loss, model_timestep
from hidream_ft.inference.validation import evaluating

TAG = "val/loss"


@dataclass
class HeldoutLoss:
    total: float  # mean over every sample and σ
    per_sigma: dict[float, float]  # mean over every sample at that σ
    samples: int


def heldout_noise(seed: int, key: str, sigma: float, shape: tuple[int, ...]) -> torch.Tensor:
    """ε of sample ``key`` at ``sigma``: float32 standard normal from a CPU generator seeded by the three alone,
    so it is the same on any device, rank and step."""
    generator = torch.Generator().manual_seed(rng_for("heldout", seed, key, repr(float(sigma))).getrandbits(63))
    return torch.randn(shape, generator=generator)


def sample_losses(model: nn.Module, batch: TrainBatch, sigma: float, seed: int, noise_scale: float,
                  device: torch.device | str) -> list[float]:
    """The x0 loss of each sample of ``batch`` noised to ``sigma`` with :func:`heldout_noise` (loss-mask
    weighted where the sample has a mask; sample weights do not apply)."""
    if batch.packed_target_counts is not None:
        raise ValueError("held-out batches are not packed: collate them one shape per batch")
    batch = batch.to(device)
    x0 = batch.x0
    noise = torch.stack([heldout_noise(seed, key, sigma, tuple(x0.shape[1:])) for key in batch.keys]).to(x0.device)
    sigmas = torch.full((batch.size,), float(sigma), device=x0.device)
    z = add_noise(x0, noise, sigmas, noise_scale)
    x_pred = model(**batch.model_inputs(z), timestep=model_timestep(sigmas),
                   output_tokens=batch.layout.num_target_tokens)
    weights = batch.token_weights
    losses = torch.stack([
        diffusion_loss(x_pred[i:i + 1], x0[i:i + 1], sigmas[i:i + 1],
                       token_weights=None if weights is None else weights[i:i + 1])
        for i in range(batch.size)
    ])
    return losses.double().cpu().tolist()


def _process_group() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def heldout_loss(model: nn.Module, batches: Sequence[TrainBatch], sigmas: Sequence[float], *, seed: int = 0,
                 noise_scale: float = NOISE_SCALE, device: torch.device | str = "cpu") -> HeldoutLoss:
    """Batch b is evaluated at every σ by rank b mod world size; a rank short of batches repeats batch 0 and
    discards the result, so every rank runs the same number of forwards. The per-sample losses (float64) are
    gathered to every rank and summed in sample order, so the result does not depend on the world size.

    Runs in eval mode under ``torch.no_grad``, restoring every submodule's train/eval flag, and draws no random
    number from any global generator: training continues exactly as without it.
    """
    if not batches or not sigmas:
        raise ValueError("heldout_loss needs at least one batch and one σ")
    rank, world_size = _process_group()
    rounds = math.ceil(len(batches) / world_size)
    mine: dict[int, list[list[float]]] = {}
    with evaluating(model), torch.no_grad():
        for round_index in range(rounds):
            index = round_index * world_size + rank
            batch = batches[index if index < len(batches) else 0]
            losses = [sample_losses(model, batch, sigma, seed, noise_scale, device) for sigma in sigmas]
            if index < len(batches):
                mine[index] = losses
    parts = [mine]
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, mine)
    by_batch = {index: losses for part in parts for index, losses in part.items()}
    per_sigma = [[loss for index in range(len(batches)) for loss in by_batch[index][s]] for s in range(len(sigmas))]
    samples = len(per_sigma[0])
    return HeldoutLoss(total=sum(sum(values) for values in per_sigma) / (samples * len(sigmas)),
                       per_sigma={float(sigma): sum(values) / samples for sigma, values in zip(sigmas, per_sigma)},
                       samples=samples)


def heldout_scalars(result: HeldoutLoss) -> dict[str, float]:
    """``val/loss`` and one ``val/loss_sigma_0.30``-style scalar per σ, for :class:`MetricsLogger`."""
    return {TAG: result.total, **{f"{TAG}_sigma_{sigma:.2f}": value for sigma, value in result.per_sigma.items()}}
