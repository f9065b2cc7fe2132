"""Bad and unusual images: each case is converted or skipped by its policy, counted, and never crashes."""

import struct
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from hidream_ft.config import DataConfig
from hidream_ft.data import build_pipeline
from hidream_ft.data.images import BadImage, probe_size, render_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def as_levels(pixels: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] → H×W×3 in 0..255."""
    return ((pixels + 1) * 127.5).permute(1, 2, 0).numpy()


def png_16bit_rgb(path, rgb16, size=(64, 64)):
    """Pillow cannot write 16-bit RGB PNGs; write the chunks by hand."""
    width, height = size
    row = b"\x00" + np.tile(np.array(rgb16, ">u2"), width).tobytes()
    chunk = lambda kind, data: (  # noqa: E731
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    pixels = zlib.compress(row * height)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def exif_rotated_jpeg(path):
    """Stored 128×64, left half red, right half blue, EXIF orientation 6 (display rotated 90° clockwise):
    displayed 64×128 with red on top."""
    image = Image.new("RGB", (128, 64), BLUE)
    image.paste(RED, (0, 0, 64, 64))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, quality=95, exif=exif)


def truncated_jpeg(path):
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_16bit_grayscale_is_rescaled_not_clipped(tmp_path):
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(tmp_path / "g.png")
    counts = Counter()
    levels = as_levels(render_image(str(tmp_path / "g.png"), (64, 64), 0.5, counts, "g"))
    assert levels == pytest.approx(np.full((64, 64, 3), 40000 / 257), abs=0.6)
    assert counts["converted_16bit"] == 1


def test_16bit_rgb_is_counted_and_converted(tmp_path):
    png_16bit_rgb(tmp_path / "c.png", (65535, 32768, 0))
    counts = Counter()
    levels = as_levels(render_image(str(tmp_path / "c.png"), (64, 64), 0.5, counts, "c"))
    assert levels[10, 10] == pytest.approx([255, 128, 0], abs=1)
    assert counts["converted_16bit"] == 1


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(tmp_path / "k.jpg", quality=95)  # pure red ink
    counts = Counter()
    levels = as_levels(render_image(str(tmp_path / "k.jpg"), (64, 64), 0.5, counts, "k"))
    assert levels[32, 32] == pytest.approx(RED, abs=12)
    assert counts["converted_cmyk"] == 1


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 0, 0] + list(BLUE) + [0] * (256 * 3 - 6))
    image.paste(1, (0, 0, 32, 64))  # left half blue, right half palette index 0 = transparent
    image.save(tmp_path / "p.png", transparency=0)
    counts = Counter()
    levels = as_levels(render_image(str(tmp_path / "p.png"), (64, 64), 0.5, counts, "p"))
    assert levels[32, 8] == pytest.approx(BLUE, abs=1)
    assert levels[32, 56] == pytest.approx(WHITE, abs=1)
    assert counts["converted_palette"] == 1 and counts["alpha_composited"] == 1


@pytest.mark.parametrize("mode, colour", [("RGBA", (*RED, 0)), ("LA", (0, 0))])
def test_transparent_pixels_become_white(tmp_path, mode, colour):
    image = Image.new(mode, (64, 64), colour)
    opaque = (*RED, 255) if mode == "RGBA" else (0, 255)
    image.paste(opaque, (0, 0, 32, 64))
    image.save(tmp_path / "a.png")
    counts = Counter()
    levels = as_levels(render_image(str(tmp_path / "a.png"), (64, 64), 0.5, counts, "a"))
    assert levels[32, 8] == pytest.approx(RED if mode == "RGBA" else (0, 0, 0), abs=1)
    assert levels[32, 56] == pytest.approx(WHITE, abs=1)
    assert counts["alpha_composited"] == 1


def test_exif_orientation_is_applied_to_size_and_pixels(tmp_path):
    exif_rotated_jpeg(tmp_path / "r.jpg")
    assert probe_size(str(tmp_path / "r.jpg"), "r") == (64, 128)
    counts = Counter()
    levels = as_levels(render_image(str(tmp_path / "r.jpg"), (64, 128), 0.5, counts, "r"))
    assert levels.shape == (128, 64, 3)
    assert levels[20, 32] == pytest.approx(RED, abs=20)
    assert levels[108, 32] == pytest.approx(BLUE, abs=20)
    assert counts["exif_rotated"] == 1


def test_small_image_is_upscaled_and_counted(tmp_path):
    Image.new("RGB", (40, 30), RED).save(tmp_path / "s.png")
    counts = Counter()
    pixels = render_image(str(tmp_path / "s.png"), (64, 64), 0.5, counts, "s")
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    assert as_levels(pixels)[32, 32] == pytest.approx(RED, abs=1)
    assert counts["too_small_upscaled"] == 1


def test_output_range_and_layout(tmp_path):
    image = Image.new("RGB", (96, 64), (0, 0, 0))
    image.paste(WHITE, (48, 0, 96, 64))
    image.save(tmp_path / "bw.png")
    pixels = render_image(str(tmp_path / "bw.png"), (96, 64), 0.5, Counter(), "bw")
    assert pixels.shape == (3, 64, 96)
    assert pixels.min().item() == -1.0 and pixels.max().item() == 1.0
    assert pixels[:, :, 0].eq(-1).all() and pixels[:, :, -1].eq(1).all()


def test_corrupt_and_truncated_files_raise_bad_image(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image")
    with pytest.raises(BadImage, match="junk.jpg"):
        probe_size(str(tmp_path / "junk.jpg"), str(tmp_path / "junk.jpg"))
    truncated_jpeg(tmp_path / "cut.jpg")
    assert probe_size(str(tmp_path / "cut.jpg"), "cut") == (128, 128)  # the header is intact
    with pytest.raises(BadImage, match="cut"):
        render_image(str(tmp_path / "cut.jpg"), (64, 64), 0.5, Counter(), "cut")


def good_image(path, colour, size=(64, 64), caption="a good image"):
    Image.new("RGB", size, colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def bad_data_folder(root):
    """Eight good images and one of each problem case."""
    root.mkdir()
    for i in range(8):
        good_image(root / f"good_{i}.png", (20 * i, 100, 200))
    (root / "junk.jpg").write_bytes(b"not an image at all")
    (root / "junk.txt").write_text("junk")
    truncated_jpeg(root / "cut.jpg")
    (root / "cut.txt").write_text("truncated")
    Image.fromarray(np.full((64, 64), 50000, np.uint16)).save(root / "gray16.png")
    (root / "gray16.txt").write_text("sixteen bit")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    (root / "cmyk.txt").write_text("cmyk")
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(root / "alpha.png")
    (root / "alpha.txt").write_text("transparent")
    exif_rotated_jpeg(root / "rotated.jpg")
    (root / "rotated.txt").write_text("rotated")
    good_image(root / "tiny.png", RED, size=(16, 16), caption="tiny")
    good_image(root / "uncaptioned.png", BLUE, caption=None)
    good_image(root / "blank.png", BLUE, caption="  \n")
    good_image(root / "latin1.png", RED, caption=None)
    (root / "latin1.txt").write_bytes("crème brûlée".encode("latin-1"))
    return root


def run_epoch(cfg, steps, workers=2):
    cfg.num_workers = workers
    pipeline = build_pipeline(cfg, seed=0, default_batch_size=1)
    seen = {}
    for step, (batch,) in pipeline.iterate():
        for sample in batch:
            seen.setdefault(sample.key, sample)
        if step + 1 == steps:
            break
    return seen, pipeline.stats()


def test_bad_data_in_folders_is_handled_and_counted_in_worker_processes(tmp_path):
    folder = bad_data_folder(tmp_path / "data")
    cfg = DataConfig(folders=[str(folder)], buckets=[[64, 64], [64, 128]])
    seen, stats = run_epoch(cfg, steps=18)  # 17 usable entries (all but junk) + 1: a full epoch at batch 1
    usable = {f"good_{i}" for i in range(8)} | {"gray16", "cmyk", "alpha", "rotated", "tiny", "uncaptioned",
                                                 "blank", "latin1"}
    assert set(seen) == usable  # cut.jpg was replaced by another image of its bucket
    assert stats["corrupt_image"] == 2  # junk.jpg at the scan, cut.jpg when loaded
    assert stats["replacement_used"] == 1 and stats["batch_short"] == 0
    assert stats["converted_16bit"] == 1 and stats["converted_cmyk"] == 1 and stats["alpha_composited"] == 1
    assert stats["exif_rotated"] == 1 and stats["too_small_upscaled"] == 1
    assert stats["caption_missing_empty"] == 2 and stats["caption_not_utf8"] == 1
    assert seen["rotated"].pixels.shape == (3, 128, 64)
    assert seen["uncaptioned"].caption == " " and seen["blank"].caption == " "
    assert seen["latin1"].caption == "cr\ufffdme br\ufffdl\ufffde"
    assert as_levels(seen["alpha"].pixels)[5, 5] == pytest.approx(WHITE, abs=1)
    assert as_levels(seen["gray16"].pixels)[5, 5] == pytest.approx([50000 / 257] * 3, abs=1)


def test_skip_policies_drop_and_count(tmp_path):
    folder = bad_data_folder(tmp_path / "data")
    cfg = DataConfig(folders=[str(folder)], buckets=[[64, 64], [64, 128]], missing_caption="skip",
                     small_images="skip")
    seen, stats = run_epoch(cfg, steps=16, workers=0)
    assert not {"tiny", "uncaptioned", "blank"} & set(seen)
    assert {"latin1", "gray16", "cmyk", "alpha", "rotated"} <= set(seen)
    assert stats["caption_missing_skipped"] == 2 and stats["caption_missing_empty"] == 0
    assert stats["too_small_skipped"] == 1 and stats["too_small_upscaled"] == 0


def test_metadata_jsonl_captions_weights_tags_and_duplicates(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    good_image(root / "a.png", RED, caption="sidecar caption")
    good_image(root / "sub" / "b.png", BLUE, caption=None)
    good_image(root / "sub" / "b.webp", BLUE, caption=None)  # same key as b.png, sorted after it: skipped
    good_image(root / "c.v2.png", RED, caption="dotted name")
    (root / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "caption": "metadata caption", "weight": 2.5, "tags": ["red", "square"]}\n'
        '{"file_name": "sub/b.png", "text": "from text key"}\n'
        "not json\n"
        '{"file_name": "missing.png", "caption": "nothing here"}\n'
    )
    seen, stats = run_epoch(DataConfig(folders=[str(root)], buckets=[[64, 64]]), steps=3, workers=0)
    assert set(seen) == {"a", "sub/b", "c_v2"}
    assert seen["a"].caption == "metadata caption, red, square" and seen["a"].weight == 2.5
    assert seen["sub/b"].caption == "from text key" and seen["sub/b"].weight == 1.0
    assert seen["c_v2"].caption == "dotted name"
    assert stats["metadata_invalid"] == 1 and stats["metadata_unmatched"] == 1
    assert stats["duplicate_key_skipped"] == 1


def test_a_folder_of_only_undecodable_images_stops_with_a_clear_error(tmp_path):
    for i in range(3):
        truncated_jpeg(tmp_path / f"cut{i}.jpg")
    cfg = DataConfig(folders=[str(tmp_path)], buckets=[[64, 64]])
    with pytest.raises(RuntimeError, match="no image of a step 0 micro-batch"):
        run_epoch(cfg, steps=1, workers=0)
