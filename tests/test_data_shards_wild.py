"""Shards not written by the packer (img2dataset, plain tar): unusable data stops with one line and ends the
process, EXIF-rotated photos, caption members and fields, counters over ranks, shard sizes, split samples."""

import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from helpers import drain_pipeline, pythonpath_with_tests
from hidream_ft.config import ConfigError, DataConfig
from hidream_ft.data import build_pipeline, stats
from hidream_ft.data.errors import DataError
from hidream_ft.demo import write_demo

RED, BLUE = (255, 0, 0), (0, 0, 255)


def png(size=(64, 64), color=(10, 200, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes | str | dict]]) -> Path:
    """A tar of ``(name, content)`` in the given order; a dict is written as JSON, a str as UTF-8."""
    with tarfile.open(path, "w") as tar:
        for name, content in members:
            data = json.dumps(content).encode() if isinstance(content, dict) else (
                content.encode() if isinstance(content, str) else content)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def small_shard(path: Path, n: int = 5) -> Path:
    """img2dataset-like samples: 64×64 images with a caption and a .json of their size."""
    members = []
    for i in range(n):
        members += [(f"{i:09d}.png", png()), (f"{i:09d}.txt", f"image {i}"),
                    (f"{i:09d}.json", {"key": f"{i:09d}", "status": "success", "width": 64, "height": 64})]
    return write_tar(path, members)


# -- samples that are all left out ---------------------------------------------------------------------


def unusable(tmp_path: Path, case: str) -> DataConfig:
    shard = tmp_path / "shard.tar"
    settings = dict(shards=[str(shard)], buckets=[[64, 64]], shuffle_buffer=2)
    if case == "too_small_skipped":  # LAION-like 64² images trained at 128²
        small_shard(shard)
        settings.update(buckets=[[128, 128]], small_images="skip")
    elif case == "caption_missing_skipped":
        write_tar(shard, [(f"{i}.png", png()) for i in range(4)])
        settings.update(missing_caption="skip")
    elif case == "no_image_skipped":
        write_tar(shard, [(f"{i}.txt", "a caption") for i in range(4)])
    else:  # corrupt_image: every image is cut short after its header
        cut = io.BytesIO()
        Image.effect_noise((128, 128), 64).convert("RGB").save(cut, "JPEG")
        write_tar(shard, [(f"{i}.jpg", cut.getvalue()[:400]) for i in range(4)])
    return DataConfig(**settings)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("case", ["too_small_skipped", "caption_missing_skipped", "no_image_skipped",
                                  "corrupt_image"])
def test_data_that_yields_no_usable_sample_stops_with_the_reason_and_counts(tmp_path, case, workers):
    cfg = unusable(tmp_path, case)
    cfg.num_workers = workers
    with pytest.raises(DataError, match=rf"the last 1000 samples read were all left out and none was used "
                                        rf"\({case} 1000\)") as error:
        drain_pipeline(cfg, steps=1, batch_size=1)
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)
    fix = {"too_small_skipped": "small_images = 'upscale'",
           "caption_missing_skipped": "txt, caption, json:caption",
           "no_image_skipped": "no sample has a .jpg/.jpeg/.png/.webp member", "corrupt_image": "cannot be decoded"}[case]
    assert fix in str(error.value)


def test_too_small_images_are_named_in_a_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(stats, "_warned", Counter())  # other tests used up this process's warnings
    cfg = unusable(tmp_path, "too_small_skipped")
    cfg.num_workers = 0
    with pytest.raises(DataError):
        drain_pipeline(cfg, steps=1, batch_size=1)
    assert "000000000: 64×64 is smaller than its bucket 128×128 (small_images = 'skip')" in caplog.text


def processes_in_session(session: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:  # the session id, after state, ppid and process group
            found.append(int(stat.parent.name))
    return found


def test_a_fatal_data_error_ends_the_trainer_and_its_workers(tmp_path):
    config = write_demo(tmp_path / "demo", steps=3)
    shard = small_shard(tmp_path / "small.tar")
    cmd = [sys.executable, "-m", "hidream_ft.train", "--config", str(config), "--set", "data.folders=[]",
           "--set", f"data.shards=['{shard}']", "--set", "data.buckets=[[128, 128]]",
           "--set", "data.small_images='skip'", "--set", "data.num_workers=2"]
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                            "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=pythonpath_with_tests())
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as process:
        try:
            _, stderr = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise AssertionError("the trainer did not end after a fatal data error") from None
        left = processes_in_session(process.pid)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert process.returncode == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.shards: the last 1000 samples read were all left out"), last
    assert "too_small_skipped 1000" in last and "Traceback" not in stderr
    assert left == [], "DataLoader workers outlived the trainer"


# -- what img2dataset and hand-made tars hold ------------------------------------------------------------


def rotated_jpeg() -> bytes:
    """Stored 128×64 (left half red), EXIF orientation 6: displayed 64×128, red on top."""
    image = Image.new("RGB", (128, 64), BLUE)
    image.paste(RED, (0, 0, 64, 64))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95, exif=exif)
    return out.getvalue()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_rotated_photo_goes_to_its_displayed_bucket_whatever_the_json_says(tmp_path, workers):
    # img2dataset with skip_reencode records the stored size, before EXIF rotation.
    shard = write_tar(tmp_path / "photos.tar", [("0.jpg", rotated_jpeg()), ("0.txt", "a phone photo"),
                                                 ("0.json", {"width": 128, "height": 64})])
    cfg = DataConfig(shards=[str(shard)], buckets=[[64, 128], [128, 64]], num_workers=workers)
    out, _, stats = drain_pipeline(cfg, steps=1, batch_size=1)
    (sample,) = out[0][1][0]
    assert sample.pixels.shape == (3, 128, 64)  # portrait: the whole image, nothing cropped away
    top, bottom = sample.pixels[:, 32], sample.pixels[:, 96]
    assert top[0].mean() > 0.9 and top[2].mean() < -0.9 and bottom[2].mean() > 0.9  # red on top, blue below
    assert stats["exif_rotated"] == 1


def captioned_shard(path: Path) -> Path:
    image = png()
    return write_tar(path, [
        ("a.png", image), ("a.caption", "from a caption member"),
        ("b.png", image), ("b.json", {"caption": "from the json caption", "alt": "b alt"}),
        ("c.png", image), ("c.json", {"text": "from the json text", "caption": "  "}),
        ("d.png", image), ("d.txt", "from txt"), ("d.json", {"caption": "second choice", "alt": "d alt"}),
        ("e.png", image),
    ])


def captions_by_key(cfg: DataConfig, steps: int = 10) -> tuple[dict[str, str], dict]:
    out, _, stats = drain_pipeline(cfg, steps=steps, batch_size=1)
    return {s.key: s.caption for _, micro_batches in out for mb in micro_batches for s in mb}, stats


@pytest.mark.parametrize("workers", [0, 2])
def test_captions_come_from_caption_members_and_json_fields(tmp_path, workers):
    shard = captioned_shard(tmp_path / "captions.tar")
    captions, stats = captions_by_key(DataConfig(shards=[str(shard)], buckets=[[64, 64]], num_workers=workers))
    assert captions == {"a": "from a caption member", "b": "from the json caption", "c": "from the json text",
                        "d": "from txt", "e": " "}
    assert stats["caption_missing_empty"] == 2  # e, read twice: 10 samples of a 5-sample shard
    chosen, _ = captions_by_key(DataConfig(shards=[str(shard)], buckets=[[64, 64]], num_workers=workers,
                                           shard_captions=["json:alt", "txt"], missing_caption="skip"))
    assert chosen == {"b": "b alt", "d": "d alt"}


def test_caption_sources_are_validated():
    with pytest.raises(ConfigError, match=r"data\.shard_captions\[1\]: expected a member suffix"):
        DataConfig(shards=["x.tar"], shard_captions=["txt", "json:"]).validate("data")


def test_mostly_uncaptioned_shards_are_reported_loudly_at_the_start(tmp_path, caplog):
    shard = write_tar(tmp_path / "bare.tar", [(f"{i}.jpg", rotated_jpeg()) for i in range(3)]
                      + [("3.jpg", rotated_jpeg()), ("3.json", {"TEXT": "upper-case field"})])
    build_pipeline(DataConfig(shards=[str(shard)], buckets=[[64, 64]], num_workers=0))
    assert "WARNING: 4 of the first 4 samples of" in caplog.text
    assert "(txt, caption, json:caption, json:text; members found: jpg, json)" in caplog.text


def test_a_plain_tar_of_a_folder_is_detected_and_the_fix_named(tmp_path, caplog):
    # `tar cf` lists a folder in directory order: a sample's members need not be next to each other.
    image = png()
    shard = write_tar(tmp_path / "plain.tar", [("a.png", image), ("b.png", image), ("a.txt", "cap a"),
                                               ("b.txt", "cap b")])
    cfg = DataConfig(shards=[str(shard)], buckets=[[64, 64]], num_workers=0)
    _, _, stats = drain_pipeline(cfg, steps=2, batch_size=1)
    assert stats["sample_split"] >= 2 and stats["caption_missing_empty"] >= 2
    assert "2 of the first 4 samples repeat an earlier key: the tar's members are not grouped" in caplog.text
    assert "tar --sort=name -cf SHARD.tar -C FOLDER ." in caplog.text


def test_every_sample_is_read_equally_often_whatever_the_size_of_its_shard(tmp_path):
    # Each draw reads a whole shard and draws are uniform, so a sample's share does not depend on its shard.
    image = png()
    solo = write_tar(tmp_path / "solo.tar", [("solo.png", image), ("solo.txt", "alone")])
    many = write_tar(tmp_path / "many.tar", [m for i in range(20) for m in ((f"m{i}.png", image),
                                                                             (f"m{i}.txt", "one of many"))])
    cfg = DataConfig(shards=[str(solo), str(many)], buckets=[[64, 64]], num_workers=0, shuffle_buffer=5)
    out, _, stats = drain_pipeline(cfg, steps=840, batch_size=1)
    counts = Counter(s.key for _, (mb,) in out for s in mb)
    per_sample = (840 - counts["solo"]) / 20
    assert 0.6 < counts["solo"] / per_sample < 1.6
    assert stats["samples_read"] >= 840 and stats["shards_read"] > 40


def test_shards_without_a_manifest_get_an_estimated_bucket_histogram(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hidream_ft.data")
    shard = write_tar(tmp_path / "wild.tar", [("w.png", png((128, 64))), ("w.txt", "wide"),
                                              ("t.png", png((64, 128))), ("t.txt", "tall")])
    cfg = DataConfig(shards=[str(shard)], buckets=[[64, 64], [128, 64], [64, 128]], num_workers=0)
    drain_pipeline(cfg, steps=1, batch_size=1)
    assert f"(estimated from the first 2 samples of {shard})" in caplog.text
    assert "128x64: 1" in caplog.text or "128×64: 1" in caplog.text


def _total_stats_on_rank(rank: int, store_path: str, shard: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        cfg = DataConfig(shards=[shard], buckets=[[64, 64]], num_workers=0)
        pipeline = build_pipeline(cfg, default_batch_size=1)
        iterator = pipeline.iterate()
        for _ in range(3 + rank):  # ranks read different amounts
            next(iterator)
        iterator.close()
        results[rank] = (pipeline.stats(), pipeline.total_stats())
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_counters_are_summed_over_ranks(tmp_path):
    shard = write_tar(tmp_path / "mixed.tar", [("a.png", png()), ("a.txt", "cap"), ("b.png", png())])
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_total_stats_on_rank, args=(str(tmp_path / "store"), str(shard), results), nprocs=2)
        (own0, total0), (own1, total1) = results[0], results[1]
    assert total0 == total1 == {key: own0[key] + own1[key] for key in own0}
    assert own0["samples_read"] > 0 and own1["samples_read"] > own0["samples_read"] - 2
    assert total0["caption_missing_empty"] == own0["caption_missing_empty"] + own1["caption_missing_empty"] > 0
