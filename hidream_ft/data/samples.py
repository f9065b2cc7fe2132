"""The training sample handed to the trainer's collate function, and how one is made from an image."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import torch

from hidream_ft.config import DataConfig
from hidream_ft.data.buckets import Bucket
from hidream_ft.data.captions import build_caption
from hidream_ft.data.images import BadImage, ImageTooLarge, render_image, render_mask
from hidream_ft.data.stats import record


@dataclass
class Sample:
    pixels: torch.Tensor  # float32 [3, H, W] in [-1, 1]; (W, H) is the bucket, multiples of 32
    caption: str  # trigger, tag shuffle and caption dropout already applied
    key: str
    weight: float = 1.0  # per-sample loss weight (metadata "weight")
    task: str = "t2i"  # "t2i", "edit" or "ip"
    references: list[torch.Tensor] = field(default_factory=list)  # edit / IP: [3, h, w] in [-1, 1], in order
    # Seeds this draw's σ and ε: fixed by seed and data position, so noise survives resumes and resharding.
    noise_seed: int = 0
    mask: torch.Tensor | None = None  # float32 [H, W] in [0, 1], cropped like ``pixels``: the loss weight per pixel


def rng_for(*parts) -> random.Random:
    """A generator determined by ``parts`` alone (string seeds are hashed with SHA-512, independent of the
    process and of PYTHONHASHSEED), so every random choice is reproducible from seed and data position."""
    return random.Random("hidream-ft:" + ":".join(map(str, parts)))


def make_sample(
    source: str | bytes,
    name: str,
    key: str,
    caption: str,
    weight: float,
    bucket: Bucket,
    cfg: DataConfig,
    seed_parts: tuple,
    counts: Counter,
    mask: str | bytes | None = None,
) -> Sample | None:
    """The sample for one image, or None when it or its loss ``mask`` cannot be decoded (counted as
    ``corrupt_image``), is larger than ``data.max_image_pixels`` (``too_large_skipped``) or its mask is black
    over the whole crop (``mask_empty_skipped``: nothing to learn). Crop and caption draw from separate
    generators so that changing a caption setting leaves the crops alone."""
    offset = rng_for("crop", *seed_parts).random() if cfg.crop == "random" else 0.5
    try:
        pixels = render_image(source, bucket, offset, counts, name, cfg.max_image_pixels)
        weights = None if mask is None else render_mask(mask, bucket, offset, f"mask of {name}", cfg.max_image_pixels)
    except ImageTooLarge as e:
        record(counts, "too_large_skipped", str(e))
        return None
    except BadImage as e:
        record(counts, "corrupt_image", str(e))
        return None
    if weights is not None and not weights.any():
        record(counts, "mask_empty_skipped", f"{name}: its mask is black over the whole crop")
        return None
    return Sample(pixels, build_caption(caption, cfg, rng_for("caption", *seed_parts)), key, weight,
                  noise_seed=rng_for("noise", *seed_parts).getrandbits(63), mask=weights)
