"""The three modules HiDream adds to Qwen3-VL; parameter names match the official checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from hidream_ft.diffusion import timestep_embedding


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
