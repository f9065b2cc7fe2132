"""How the frozen perceptual networks see the model's pixels: [-1, 1] images squashed to a square side and
normalized with a network's channel statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def square_resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """[B, C, H, W] → [B, C, resolution, resolution], bilinear with antialiasing.

    A non-square image is squashed rather than cropped so the features see the whole picture; prediction and
    target are squashed alike, so a comparison between them is unaffected by the distortion.
    """
    if images.shape[-2:] == (resolution, resolution):
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True,
                         align_corners=False)


def normalize_channels(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[-1, 1] images → (x01 - mean) / std per channel, with x01 = (x + 1) / 2."""
    shape = (1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(shape)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(shape)
    return ((images + 1) / 2 - mean_t) / std_t
