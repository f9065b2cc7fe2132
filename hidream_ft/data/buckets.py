"""Aspect-ratio buckets, nearest-bucket assignment, crop boxes and the resolution schedule (stages).

All functions are pure. A bucket is a ``(width, height)`` tuple of multiples of 32 (one 32×32 patch per token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hidream_ft.config import ConfigError, DataConfig, check_buckets
from hidream_ft.model.patches import PATCH_SIZE

Bucket = tuple[int, int]

_ASSIGN_CHUNK = 65536


def buckets_for_area(area: int, step: int = PATCH_SIZE, max_aspect: float = 2.5) -> list[Bucket]:
    """For every short side that is a multiple of ``step``, the longest multiple-of-``step`` long side whose
    area is at most ``area``, in both orientations, up to ``max_aspect``:1. Sorted by aspect ratio."""
    buckets = set()
    for short in range(step, math.isqrt(area) + 1, step):
        long = area // short // step * step
        if long >= short and long / short <= max_aspect:
            buckets.update({(short, long), (long, short)})
    return sorted(buckets, key=lambda b: b[0] / b[1])


def assign_buckets(widths, heights, buckets: list[Bucket]) -> tuple[np.ndarray, np.ndarray]:
    """Nearest bucket of each image: the least aspect-ratio distortion (|log ratio difference|, so 2:1 and 1:2
    are equally far from 1:1); among equally distorting buckets the largest one the image covers without
    upscaling, else the smallest. Returns (bucket index, needs upscaling) arrays."""
    widths = np.asarray(widths, dtype=np.float64).reshape(-1, 1)
    heights = np.asarray(heights, dtype=np.float64).reshape(-1, 1)
    if len(widths) > _ASSIGN_CHUNK:  # bounds the images × buckets temporaries
        parts = [
            assign_buckets(widths[i : i + _ASSIGN_CHUNK], heights[i : i + _ASSIGN_CHUNK], buckets)
            for i in range(0, len(widths), _ASSIGN_CHUNK)
        ]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    bucket_w = np.array([b[0] for b in buckets], dtype=np.float64).reshape(1, -1)
    bucket_h = np.array([b[1] for b in buckets], dtype=np.float64).reshape(1, -1)
    # Quantised so that equal ratios compare equal despite float noise; 1e-6 is far below any real difference.
    distortion = np.rint(np.abs(np.log(bucket_w / bucket_h) - np.log(widths / heights)) * 1e6).astype(np.int64)
    upscale = (bucket_w > widths) | (bucket_h > heights)
    area = (bucket_w * bucket_h).astype(np.int64)
    max_area = int(area.max()) + 1
    size_rank = np.where(upscale, max_area + area, max_area - area)  # fitting buckets first, larger first
    key = distortion * (4 * max_area) + size_rank
    chosen = np.argmin(key, axis=1)
    rows = np.arange(len(chosen))
    return chosen, upscale[rows, chosen]


def crop_box(width: int, height: int, bucket: Bucket, offset: float = 0.5) -> tuple[float, float, float, float]:
    """Largest region of a ``width``×``height`` image with the bucket's aspect ratio, as (left, top, right,
    bottom) in source pixels. ``offset`` in [0, 1] places it along the axis that has slack (0.5 = centred)."""
    scale = max(bucket[0] / width, bucket[1] / height)  # the image is scaled to cover the bucket
    crop_w, crop_h = bucket[0] / scale, bucket[1] / scale
    left = (width - crop_w) * offset
    top = (height - crop_h) * offset
    return (left, top, left + crop_w, top + crop_h)


@dataclass(frozen=True)
class Stage:
    """One resolution stage, fully resolved: used for steps ``[first_step, until_step)``."""

    index: int
    first_step: int
    until_step: int | None  # None: until the end of training
    buckets: tuple[Bucket, ...]
    batch_size: int
    max_tokens: int = 0  # > 0: packed micro-batches of up to this many tokens, batch_size unused

    def describe(self) -> str:
        end = "the end" if self.until_step is None else f"step {self.until_step}"
        batch = f"{self.max_tokens} tokens" if self.max_tokens else f"batch {self.batch_size}"
        return f"stage {self.index} (steps {self.first_step} to {end}, {batch}/rank)"


def resolve_stages(cfg: DataConfig, default_batch_size: int) -> list[Stage]:
    """Stages from ``[[data.stages]]``, or one stage from the top-level buckets and the trainer's batch size.
    A stage without ``area`` or ``buckets`` inherits the top-level ones, one without ``batch_size`` or
    ``max_tokens`` the top-level ``data.max_tokens`` (when set) or the batch size; the last stage runs forever."""
    if default_batch_size < 1:
        raise ConfigError(f"train.batch_size: must be at least 1, got {default_batch_size}")
    specs = cfg.stages or [None]
    stages = []
    first_step = 0
    for i, spec in enumerate(specs):
        where = f"data.stages[{i}]" if spec is not None else "data"
        if spec is not None and spec.buckets:
            buckets = check_buckets(spec.buckets, f"{where}.buckets")
        elif spec is not None and spec.area is not None:
            buckets = _generated(spec.area, cfg, f"{where}.area")
        elif cfg.buckets:
            buckets = check_buckets(cfg.buckets, "data.buckets")
        else:
            buckets = _generated(cfg.area, cfg, "data.area")
        batch_size = spec.batch_size if spec is not None and spec.batch_size is not None else default_batch_size
        if spec is not None and spec.max_tokens is not None:
            max_tokens = spec.max_tokens
        else:
            max_tokens = 0 if spec is not None and spec.batch_size is not None else cfg.max_tokens
        last = i == len(specs) - 1
        until_step = None if spec is None or last else spec.until_step
        stages.append(Stage(i, first_step, until_step, tuple(buckets), batch_size, max_tokens))
        first_step = until_step if until_step is not None else first_step
    return stages


def _generated(area: int, cfg: DataConfig, where: str) -> list[Bucket]:
    buckets = buckets_for_area(area, cfg.bucket_step, cfg.max_aspect)
    if not buckets:
        raise ConfigError(
            f"{where}: area {area} gives no bucket with sides that are multiples of {cfg.bucket_step} "
            f"and aspect ratio at most {cfg.max_aspect}"
        )
    return buckets


def stage_at(stages: list[Stage], step: int) -> Stage:
    return next(stage for stage in stages if stage.until_step is None or step < stage.until_step)


def stage_assignment(widths, heights, stage: Stage, small_images: str) -> np.ndarray:
    """Bucket index of every image in ``stage``; -1 for images the stage skips (too small, policy "skip")."""
    index, upscale = assign_buckets(widths, heights, list(stage.buckets))
    if small_images == "skip":
        index = np.where(upscale, -1, index)
    return index


def bucket_histogram(assignment: np.ndarray, weights, buckets: tuple[Bucket, ...]) -> dict[Bucket, int]:
    counts = np.bincount(assignment[assignment >= 0], weights=np.asarray(weights)[assignment >= 0],
                         minlength=len(buckets))
    return {bucket: int(n) for bucket, n in zip(buckets, counts) if n}


def histogram_text(counts: dict[Bucket, int]) -> str:
    total = sum(counts.values()) or 1
    rows = [f"{w}x{h}: {n} ({100 * n / total:.1f}%)" for (w, h), n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return ", ".join(rows) if rows else "(empty)"
