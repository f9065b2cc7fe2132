"""Measure data loading speed: decode + crop + resize to a 1024² bucket, per CPU worker and through the pipeline.

    python -m hidream_ft.data.bench [--source 2048x1536] [--format jpg] [--images 16] [--workers 2]

Synthetic images (smooth gradients, shapes and grain, so they compress like photos) are written to a temporary
folder first.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from hidream_ft.cli import entry_point, image_size, int_at_least
from hidream_ft.config import DataConfig
from hidream_ft.data.pipeline import build_pipeline
from hidream_ft.data.samples import make_sample

# (batch, seconds per step) at the two ends of a GPU LoRA step at 1024²: the demand to keep up with.
_GPU_STEPS = ((1, 0.15), (4, 0.6))


def write_synthetic_images(folder: Path, count: int, size: tuple[int, int], image_format: str = "jpg",
                           seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    width, height = size
    paths = []
    for index in range(count):
        x = np.linspace(0, 1, width)[None, :, None]
        y = np.linspace(0, 1, height)[:, None, None]
        colours = rng.uniform(0, 255, (2, 3))
        pixels = colours[0] * (1 - x * y) + colours[1] * (x * y) + rng.normal(0, 6, (height, width, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
            radius = rng.uniform(0.03, 0.2) * min(size)
            draw.ellipse((x0 - radius, y0 - radius, x0 + radius, y0 + radius), fill=tuple(rng.integers(0, 256, 3)))
        path = folder / f"synthetic_{index:04d}.{image_format}"
        image.save(path, quality=92)  # PNG ignores the quality
        (folder / f"synthetic_{index:04d}.txt").write_text(f"synthetic image {index}")
        paths.append(path)
    return paths


def per_worker_rate(paths: list[Path], bucket: tuple[int, int], seconds: float) -> tuple[float, float]:
    """Samples per wall-clock second and per CPU second of one process decoding, cropping, resizing and
    converting to a tensor, with one torch thread as in a DataLoader worker. The CPU-second rate is what a
    worker with a core to itself achieves, even on a busy machine."""
    torch.set_num_threads(1)
    cfg = DataConfig()
    counts: Counter = Counter()
    done, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds or done < len(paths):
        path = paths[done % len(paths)]
        make_sample(str(path), str(path), path.stem, "caption", 1.0, bucket, cfg, (done,), counts)
        done += 1
    return done / (time.perf_counter() - start), done / (time.process_time() - cpu_start)


def pipeline_rate(folder: Path, bucket: tuple[int, int], workers: int, seconds: float) -> float:
    """Samples per second through build_pipeline + DataLoader workers (batch 1), after a warm-up."""
    cfg = DataConfig(folders=[str(folder)], buckets=[list(bucket)], num_workers=workers)
    steps = build_pipeline(cfg, seed=0, default_batch_size=1).iterate()
    for _ in range(max(2, 2 * workers)):
        next(steps)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(steps)
        done += 1
    rate = done / (time.perf_counter() - start)
    steps.close()
    return rate


@entry_point
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m hidream_ft.data.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=image_size, default="2048x1536",
                        help="synthetic image size WxH (default 2048x1536)")
    parser.add_argument("--format", default="jpg", choices=["jpg", "png", "webp"], help="image format (default jpg)")
    parser.add_argument("--images", type=int_at_least(1), default=16, help="number of synthetic images (default 16)")
    parser.add_argument("--size", type=int_at_least(1), default=1024,
                        help="output bucket side (default 1024: a 1024² bucket)")
    parser.add_argument("--workers", type=int_at_least(0), default=os.cpu_count() or 1,
                        help="DataLoader workers for the pipeline measurement (default: CPU count)")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per measurement (default 5)")
    args = parser.parse_args(argv)
    source = args.source
    bucket = (args.size, args.size)
    with tempfile.TemporaryDirectory(prefix="hidream_bench_") as tmp:
        paths = write_synthetic_images(Path(tmp), args.images, source, args.format)
        mean_kib = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        print(f"{args.images} synthetic {source[0]}x{source[1]} {args.format.upper()}s (mean {mean_kib:.0f} KiB) "
              f"→ {bucket[0]}x{bucket[1]}")
        wall_rate, rate = per_worker_rate(paths, bucket, args.seconds)
        print(f"per worker (decode + crop + resize + tensor): {rate:.1f} samples per CPU second "
              f"({1000 / rate:.1f} ms/sample); {wall_rate:.1f} samples/s wall clock")
        piped = pipeline_rate(Path(tmp), bucket, args.workers, args.seconds)
        print(f"pipeline, {args.workers} workers on {os.cpu_count()} CPUs, batch 1: {piped:.1f} samples/s")
    demand = max(batch / seconds for batch, seconds in _GPU_STEPS)
    steps = " to ".join(f"batch {batch} in {seconds} s" for batch, seconds in _GPU_STEPS)
    print(f"a GPU LoRA step at 1024² ({steps}) consumes up to {demand:.1f} samples/s: "
          f"{math.ceil(demand / rate)} workers per GPU at this per-worker rate")


if __name__ == "__main__":
    sys.exit(main())
