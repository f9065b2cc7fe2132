"""The perceptual terms of the training loss: the predicted and target patch tokens of each sample made into
images, compared by frozen networks, masked to a σ range and averaged with the sample weights."""

from __future__ import annotations

import torch

from hidream_ft.config.training import PerceptualConfig
from hidream_ft.model.geometry import PATCH_SIZE
from hidream_ft.model.patches import unpatchify
from hidream_ft.perceptual.dino import DinoFeatures, dino_loss
from hidream_ft.perceptual.images import square_resize
from hidream_ft.perceptual.lpips import LPIPS, lpips_loss


def square_images(tokens: torch.Tensor, grids: list[tuple[int, int]], counts: list[int] | None,
                  resolution: int) -> torch.Tensor:
    """Each sample's target tokens as an fp32 image squashed to [B, 3, resolution, resolution].

    ``tokens``: [B, N, 3072], or [Σ counts, 3072] with ``counts`` for a packed row; ``grids``: each sample's
    (rows, columns) of patches.
    """
    samples = tokens.split(counts) if counts is not None else tokens.unbind(0)
    return torch.cat([
        square_resize(unpatchify(sample[None].float(), rows * PATCH_SIZE, columns * PATCH_SIZE), resolution)
        for sample, (rows, columns) in zip(samples, grids, strict=True)
    ])


def keep_masked_tokens(x_pred: torch.Tensor, x0: torch.Tensor, token_weights: torch.Tensor | None) -> torch.Tensor:
    """The prediction with each token blended toward the target by its loss weight (a weight of 0 shows the
    target), so that regions a loss mask leaves out add no perceptual difference."""
    if token_weights is None:
        return x_pred
    return x0 + token_weights.unsqueeze(-1).to(x_pred.dtype) * (x_pred - x0)


def in_sigma_range(sigmas: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """[B] 1.0 where σ ∈ [sigma_min, sigma_max], else 0.0."""
    return ((sigmas >= sigma_min) & (sigmas <= sigma_max)).float()


def masked_weighted_mean(per_sample: torch.Tensor, mask: torch.Tensor, sample_weights: torch.Tensor) -> torch.Tensor:
    """mean(term·mask·w): the main loss's sample average, with out-of-range samples counting zero."""
    return (per_sample * mask * sample_weights.float()).mean()


class PerceptualLoss:
    """The frozen networks of ``[perceptual]`` and their weights: :meth:`terms` gives each term's unweighted value
    for one micro-batch, :meth:`weighted` their weighted sum, the part they add to the loss."""

    def __init__(self, cfg: PerceptualConfig, dino: DinoFeatures | None, lpips: LPIPS | None) -> None:
        self.cfg = cfg
        self.nets = {name: net for name, net in (("dino", dino), ("lpips", lpips)) if net is not None}
        self.weights = {"dino": cfg.dino_weight, "lpips": cfg.lpips_weight}

    @classmethod
    def from_config(cls, cfg: PerceptualConfig, device: torch.device) -> PerceptualLoss | None:
        """The networks on ``device`` (bf16 on CUDA, fp32 elsewhere), frozen; None when both weights are 0."""
        if not cfg.enabled:
            return None
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        dino = DinoFeatures.load(cfg.dino_path, cfg.resolution, device=device, dtype=dtype) \
            if cfg.dino_weight > 0 else None
        lpips = LPIPS.load(cfg.lpips_path, cfg.lpips_net, cfg.resolution, device=device, dtype=dtype) \
            if cfg.lpips_weight > 0 else None
        return cls(cfg, dino, lpips)

    def terms(self, x_pred: torch.Tensor, x0: torch.Tensor, sigmas: torch.Tensor, grids: list[tuple[int, int]],
              counts: list[int] | None, sample_weights: torch.Tensor,
              token_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each term's unweighted micro-batch value (a scalar), keyed by name.

        Every sample is computed and the out-of-range ones masked afterwards: selecting them first would make
        the host wait for σ on the device.
        """
        resolution = self.cfg.resolution
        prediction = square_images(keep_masked_tokens(x_pred, x0, token_weights), grids, counts, resolution)
        target = square_images(x0, grids, counts, resolution)
        mask = in_sigma_range(sigmas, self.cfg.sigma_min, self.cfg.sigma_max)
        per_sample = {"dino": dino_loss, "lpips": lpips_loss}
        return {name: masked_weighted_mean(per_sample[name](net, prediction, target), mask, sample_weights)
                for name, net in self.nets.items()}

    def weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ weight·term over :meth:`terms`' values."""
        return sum(self.weights[name] * value for name, value in terms.items())
