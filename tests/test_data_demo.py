"""The bundled demo dataset and the loading benchmark's command line."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from hidream_ft.config import DataConfig
from hidream_ft.data import build_pipeline
from hidream_ft.data.bench import main as bench_main
from hidream_ft.data.demo import write_demo_dataset


def test_demo_dataset_has_distinct_captioned_images_and_is_deterministic(tmp_path):
    folder = write_demo_dataset(tmp_path / "a", n=8)
    images = sorted(folder.glob("*.png"))
    assert [p.name for p in images] == [f"demo_{i:03d}.png" for i in range(8)]
    pixels = [np.asarray(Image.open(p)) for p in images]
    assert all(p.shape == (64, 64, 3) for p in pixels)
    assert len({p.tobytes() for p in pixels}) == 8
    captions = [p.with_suffix(".txt").read_text().strip() for p in images]
    assert len(set(captions)) == 8
    assert captions[0] == "a red circle on a white background"
    assert captions[5] == "an orange cross on a white background"
    again = write_demo_dataset(tmp_path / "b", n=8)
    digest = lambda f: [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(f.iterdir())]  # noqa: E731
    assert digest(folder) == digest(again)


def test_demo_dataset_size_and_limits(tmp_path):
    folder = write_demo_dataset(tmp_path, n=30, size=(96, 64))
    assert Image.open(folder / "demo_029.png").size == (96, 64)
    assert "grey" not in (folder / "demo_023.txt").read_text() and "black" in (folder / "demo_024.txt").read_text()
    with pytest.raises(ValueError, match="between 1 and 72"):
        write_demo_dataset(tmp_path, n=73)


def test_demo_dataset_trains_in_tiny_buckets(tmp_path):
    write_demo_dataset(tmp_path / "square", n=4, size=(64, 64))
    write_demo_dataset(tmp_path / "wide", n=4, size=(96, 64))
    cfg = DataConfig(folders=[str(tmp_path / "square"), str(tmp_path / "wide")], buckets=[[64, 64], [96, 64]],
                     num_workers=0)
    iterator = build_pipeline(cfg, default_batch_size=4).iterate()
    shapes = {tuple(s.pixels.shape) for _ in range(4) for s in next(iterator)[1][0]}
    assert shapes == {(3, 64, 64), (3, 64, 96)}


def test_bench_runs_and_reports_rates(capsys):
    bench_main(["--source", "128x96", "--size", "64", "--images", "2", "--seconds", "0.05", "--workers", "0"])
    out = capsys.readouterr().out
    assert "per worker (decode + crop + resize + tensor):" in out and "samples/s" in out
    assert "workers per GPU" in out
