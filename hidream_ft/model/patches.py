"""Pixel images ↔ the model's patch tokens: 32×32×3 = 3072 values per token."""

from __future__ import annotations

import torch
from einops import rearrange

PATCH_SIZE = 32


def patchify(images: torch.Tensor, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/p)·(W/p), C·p·p]: row-major patches, each token channel-major."""
    _, _, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {w}x{h} is not a multiple of the patch size {patch_size}")
    return rearrange(images, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=patch_size, p2=patch_size)


def unpatchify(tokens: torch.Tensor, height: int, width: int, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """Inverse of :func:`patchify` for an image of ``height`` × ``width`` pixels."""
    return rearrange(
        tokens, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=height // patch_size, w=width // patch_size,
        p1=patch_size, p2=patch_size,
    )
