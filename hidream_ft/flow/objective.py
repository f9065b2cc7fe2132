"""The training objective of HiDream-O1 as pure functions.

The model predicts the clean image x0 in patch space. With σ ∈ (0, 1] and noise scale s:
    z_σ = (1 - σ)·x0 + σ·s·ε,   model timestep t = 1 - σ,   loss = MSE(x̂0, x0) on target tokens,
or, optionally, the velocity-space form ‖x̂0 - x0‖² / max(σ, floor)² (v = (x0 - z)/σ).
"""

from __future__ import annotations

import torch

from hidream_ft.flow.noise import NOISE_SCALE, shift_sigmas


def sample_sigmas(
    batch_size: int,
    *,
    method: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
    sigma_min: float = 0.001,
    sigma_max: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw one σ per sample: uniform (the paper's SFT) or logit-normal (its pretraining), then shift and clamp."""
    draw = dict(generator=generator, dtype=torch.float64, device=generator.device if generator else "cpu")
    if method == "uniform":
        u = torch.rand(batch_size, **draw)
    elif method == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(batch_size, **draw))
    else:
        raise ValueError(f"unknown timestep sampling method {method!r}; expected 'uniform' or 'logit_normal'")
    sigmas = shift_sigmas(u, shift)
    # Uniform draws are mapped into [min, max] rather than clipped, so no probability piles up at the ends.
    sigmas = sigma_min + (sigma_max - sigma_min) * sigmas
    return sigmas.to(device=device, dtype=torch.float32)


def draw_sigmas_and_noise(
    seeds: list[int], token_shape: tuple[int, ...], device: torch.device | str, **sigma_options
) -> tuple[torch.Tensor, torch.Tensor]:
    """One σ and one ε per sample, each from its own seed.

    Seeding per sample (from the sample's identity and epoch) makes the draw independent of how the global
    batch is split over ranks and of where a run was resumed: 1 rank and 8 ranks see the same noise.
    """
    draws = [_draw_sigma_and_noise(seed, token_shape, device, sigma_options) for seed in seeds]
    return torch.cat([sigma for sigma, _ in draws]), torch.stack([noise for _, noise in draws])


def draw_packed_sigmas_and_noise(
    seeds: list[int], token_counts: list[int], token_dim: int, device: torch.device | str, **sigma_options
) -> tuple[torch.Tensor, torch.Tensor]:
    """The draws of :func:`draw_sigmas_and_noise` for samples of different token counts (a packed row): one σ
    per sample and every sample's ε [count, token_dim], concatenated in sample order."""
    draws = [_draw_sigma_and_noise(seed, (count, token_dim), device, sigma_options)
             for seed, count in zip(seeds, token_counts, strict=True)]
    return torch.cat([sigma for sigma, _ in draws]), torch.cat([noise for _, noise in draws])


def _draw_sigma_and_noise(seed: int, token_shape: tuple[int, ...], device, sigma_options: dict):
    generator = torch.Generator(device).manual_seed(seed)
    sigma = sample_sigmas(1, generator=generator, device=device, **sigma_options)
    return sigma, torch.randn(token_shape, generator=generator, device=device)


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, noise_scale: float = NOISE_SCALE
) -> torch.Tensor:
    """z_σ = (1 - σ)·x0 + σ·noise_scale·ε with one σ per sample (broadcast over tokens and channels).

    The coefficients 1 - σ and σ·noise_scale are computed in the wider of σ's and x0's dtypes and rounded once
    to x0's dtype, so a float64 σ (a sampler step) gives exactly the Python-float arithmetic of the official
    sampler.
    """
    s = sigmas.to(torch.promote_types(sigmas.dtype, x0.dtype)).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s).to(x0.dtype) * x0 + (s * noise_scale).to(x0.dtype) * noise


def model_timestep(sigmas: torch.Tensor) -> torch.Tensor:
    """The timestep the model is conditioned on: the clean fraction 1 - σ."""
    return 1.0 - sigmas


def diffusion_loss(
    x_pred: torch.Tensor,
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    kind: str = "x0",
    sigma_floor: float = 0.05,
    token_mask: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
    token_counts: list[int] | None = None,
) -> torch.Tensor:
    """Mean squared error on the target tokens, in fp32.

    ``token_mask`` [B, N] selects which tokens count (padding or reference tokens are excluded);
    ``token_weights`` (shaped like the error: [B, N], or [Σ counts] when packed) weighs them: each sample's
    loss is then Σ w·err / Σ w (the data pipeline leaves out samples whose weights are all 0);
    ``token_counts`` says that x_pred and x0 are [Σ counts, D], the tokens of samples of different sizes one
    after the other (a packed row); ``kind="velocity"`` weights each sample by 1/max(σ, floor)², the loss on
    v = (x - z)/σ; ``sample_weights`` [B] multiply each sample's loss before the mean over samples.
    """
    err = (x_pred.float() - x0.float()).pow(2).mean(dim=-1)  # [B, N], or [Σ counts] when packed
    if token_counts is not None and token_weights is not None:
        per_sample = torch.stack([
            (tokens * weights).sum() / weights.sum().clamp_min(1e-12)
            for tokens, weights in zip(err.split(token_counts), token_weights.float().split(token_counts))
        ])
    elif token_counts is not None:
        per_sample = torch.stack([tokens.mean() for tokens in err.split(token_counts)])
    elif token_mask is None and token_weights is None:
        per_sample = err.mean(dim=1)
    else:
        weights = torch.ones_like(err) if token_mask is None else token_mask.to(err.dtype)
        if token_weights is not None:
            weights = weights * token_weights.float()
        # The floor only matters for a sample without a counted token, whose numerator is 0 as well.
        per_sample = (err * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-12)
    if kind == "velocity":
        per_sample = per_sample / sigmas.float().clamp_min(sigma_floor).pow(2)
    elif kind != "x0":
        raise ValueError(f"unknown loss kind {kind!r}; expected 'x0' or 'velocity'")
    if sample_weights is not None:
        # A weight scales its sample's loss (and gradient) whatever else is in the micro-batch, even alone.
        per_sample = per_sample * sample_weights.float()
    return per_sample.mean()
