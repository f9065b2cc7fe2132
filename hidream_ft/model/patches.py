"""The model's pixel format: RGB images as float32 in [-1, 1] (to and from 8-bit) and their patch tokens of
32×32×3 = 3072 values."""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from hidream_ft.model.geometry import PATCH_DIM, PATCH_SIZE


def pixels_from_uint8(values: torch.Tensor) -> torch.Tensor:
    """8-bit codes → float32 in [-1, 1], exactly as the official pipeline computes it: (u/255 - 0.5)/0.5."""
    return (values.to(torch.float32) / 255).sub_(0.5).div_(0.5)


def uint8_from_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """Float pixels in [-1, 1] → 8-bit codes, clipped and rounded; the inverse of :func:`pixels_from_uint8`."""
    return pixels.float().add(1.0).div_(2.0).clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)


def pixels_from_image(image: Image.Image) -> torch.Tensor:
    """RGB image → float32 [3, H, W] in [-1, 1]."""
    return pixels_from_uint8(torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1))


def image_from_pixels(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] → RGB image (the exact inverse of :func:`pixels_from_image`)."""
    return Image.fromarray(uint8_from_pixels(pixels.detach()).permute(1, 2, 0).cpu().numpy(), "RGB")


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
