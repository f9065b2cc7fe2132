"""The three modules HiDream adds to Qwen3-VL; parameter names match the official checkpoint."""

from __future__ import annotations

import math

import torch
from torch import nn



def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0, scale: float = 1000.0):
    """Sinusoidal features [cos, sin] of scale·t, as the `<|tms_token|>` embedder expects (cosines first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = scale * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """t = 1 - σ → the hidden vector that replaces the `<|tms_token|>` embedding."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t, self.frequency_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class BottleneckPatchEmbed(nn.Module):
    """Patch (3072 values) → hidden through a linear bottleneck of hidden/4, no nonlinearity."""

    def __init__(self, patch_dim: int, hidden_size: int):
        super().__init__()
        self.proj1 = nn.Linear(patch_dim, hidden_size // 4, bias=False)
        self.proj2 = nn.Linear(hidden_size // 4, hidden_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj2(self.proj1(patches))


class FinalLayer(nn.Module):
    """Hidden → predicted clean patch."""

    def __init__(self, hidden_size: int, patch_dim: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden)
