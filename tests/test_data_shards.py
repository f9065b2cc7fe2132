"""Shards: packing round trip, same samples as folders, streaming determinism, exact resume, bad shards."""

import functools
import io
import json
import tarfile
from collections import Counter

import pytest
import torch
from PIL import Image

from helpers import drain_pipeline
from hidream_ft.config import DataConfig, DataStage
from hidream_ft.data import build_pipeline
from hidream_ft.data.demo import write_demo_dataset
from hidream_ft.data.pack import main as pack_main
from hidream_ft.data.pack import pack

BUCKETS = [[64, 64], [96, 64], [64, 96]]
SIZES = {"square": (128, 128), "wide": (192, 128), "tall": (128, 192)}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Images larger than their buckets (so every sample is resized), three aspect ratios, 6 each."""
    root = tmp_path_factory.mktemp("source")
    for name, size in SIZES.items():
        write_demo_dataset(root / name, n=6, size=size)
    return root


@pytest.fixture(scope="module")
def shards(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    manifest = pack(source, out, shard_size=5)
    return out, manifest


def shard_cfg(shards, **overrides):
    out, manifest = shards
    settings = dict(shards=[str(out / manifest["shard_pattern"])], buckets=BUCKETS, num_workers=2,
                    shuffle_buffer=3)
    settings.update(overrides)
    return DataConfig(**settings)


collect = functools.partial(drain_pipeline, world_size=2, seed=3)


def flat(out):
    return [(s.key, s.caption, s.noise_seed, s.pixels) for _, micro_batches in out for mb in micro_batches for s in mb]


def assert_same(a, b):
    assert [step for step, _ in a] == [step for step, _ in b]
    for (*fields_a, pixels_a), (*fields_b, pixels_b) in zip(flat(a), flat(b), strict=True):
        assert fields_a == fields_b
        assert torch.equal(pixels_a, pixels_b)


def test_pack_round_trip(source, shards):
    out, manifest = shards
    assert manifest["count"] == 18 and [s["count"] for s in manifest["shards"]] == [5, 5, 5, 3]
    assert manifest["shard_pattern"] == "shard-{000000..000003}.tar"
    assert manifest["sizes"] == {"128x128": 6, "128x192": 6, "192x128": 6}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [f"shard-00000{i}.tar" for i in range(4)]
    members = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                members[member.name] = tar.extractfile(member).read()
    assert len(members) == 18 * 3
    meta = json.loads(members["wide/demo_002.json"])
    assert (meta["width"], meta["height"], meta["weight"]) == (192, 128, 1.0)
    assert members["wide/demo_002.png"] == (source / "wide" / "demo_002.png").read_bytes()
    assert members["wide/demo_002.txt"].decode() == (source / "wide" / "demo_002.txt").read_text().strip()


def test_pack_refuses_to_mix_with_old_shards_and_the_cli_overwrites(source, tmp_path, capsys):
    pack(source, tmp_path, shard_size=100)
    with pytest.raises(FileExistsError, match="--overwrite"):
        pack(source, tmp_path, shard_size=7)
    pack_main([str(source), str(tmp_path), "--shard-size", "7", "--overwrite"])
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [f"shard-00000{i}.tar" for i in range(3)]
    assert "shard-{000000..000002}.tar" in capsys.readouterr().out


def test_folders_and_shards_give_identical_samples(source, shards):
    folder_cfg = DataConfig(folders=[str(source)], buckets=BUCKETS, num_workers=0, trigger="sks")
    pipeline = build_pipeline(folder_cfg, seed=3, default_batch_size=1)
    from_folder = {}
    for step, (batch,) in pipeline.iterate():
        from_folder[batch[0].key] = batch[0]
        if step == 17:
            break
    assert len(from_folder) == 18
    streamed, _, _ = collect(shard_cfg(shards, trigger="sks", num_workers=0), steps=12)
    for key, caption, _, pixels in flat(streamed):
        assert caption == from_folder[key].caption and caption.startswith("sks, a")
        assert torch.equal(pixels, from_folder[key].pixels)


def test_streaming_is_deterministic_per_seed_and_different_per_rank(shards):
    cfg = shard_cfg(shards, crop="random", caption_dropout=0.2)
    first, _, _ = collect(cfg, steps=6, grad_accum=2)
    again, _, _ = collect(cfg, steps=6, grad_accum=2)
    assert_same(first, again)
    other_rank, _, _ = collect(cfg, steps=6, grad_accum=2, rank=1)
    other_seed, _, _ = collect(cfg, steps=6, grad_accum=2, seed=4)
    keys = [sample[0] for sample in flat(first)]
    assert keys != [sample[0] for sample in flat(other_rank)] and keys != [sample[0] for sample in flat(other_seed)]


def test_streaming_never_runs_out_with_fewer_shards_than_workers(source, tmp_path):
    pack(source / "square", tmp_path, shard_size=100)  # a single shard for 2 ranks x 2 workers
    cfg = DataConfig(shards=[str(tmp_path / "shard-000000.tar")], buckets=BUCKETS, num_workers=2)
    for rank in (0, 1):
        out, _, _ = collect(cfg, steps=15, rank=rank)  # 30 samples from a 6-sample shard
        assert [step for step, _ in out] == list(range(15))
        assert all(len(mb) == 2 for _, (mb,) in out)


def test_streaming_resume_is_exact_across_a_stage_switch(shards):
    cfg = shard_cfg(shards, crop="random", shuffle_tags=True,
                    stages=[DataStage(until_step=5, batch_size=2), DataStage(buckets=[[64, 64]], batch_size=3)])
    full, states, _ = collect(cfg, steps=10, grad_accum=2)
    assert any(cursor["pending"] for cursor in states[3]["streams"])  # samples were waiting in bucket queues
    shapes = [{tuple(s.pixels.shape[1:]) for mb in mbs for s in mb} for _, mbs in full]
    assert all(shape == {(64, 64)} for shape in shapes[5:])
    assert len({shape for step_shapes in shapes[:5] for shape in step_shapes}) > 1
    for saved in (3, 4, 6):
        resumed, _, _ = collect(cfg, steps=9 - saved, start_step=saved + 1, grad_accum=2, state=states[saved])
        assert_same(full[saved + 1 :], resumed)


def test_streaming_state_of_another_rank_restarts_deterministically(shards, caplog):
    cfg = shard_cfg(shards)
    _, states, _ = collect(cfg, steps=3, rank=0)
    first, _, _ = collect(cfg, steps=2, start_step=3, state=states[-1], rank=1)
    again, _, _ = collect(cfg, steps=2, start_step=3, rank=1)
    assert_same(first, again)
    assert "streams restart from a fresh position derived from step 3" in caplog.text


def bad_tar(path, good_png, bad_jpeg):
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("good.png", good_png)
        add("good.txt", b"a good one")
        add("cut.jpg", bad_jpeg)
        add("cut.txt", b"truncated")
        add("lonely.txt", b"no image")
        add("nosize.png", good_png)  # no json: size read from the header
        add("nosize.txt", "caf\xe9".encode("latin-1"))
        add("badjson.png", good_png)
        add("badjson.json", b"{not json")
    data = path.read_bytes()
    path.with_name("broken.tar").write_bytes(data[: len(data) // 2])  # cut inside a member


def test_bad_shard_content_is_counted_and_never_crashes(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(png, "PNG")
    jpeg = io.BytesIO()
    Image.effect_noise((128, 128), 64).convert("RGB").save(jpeg, "JPEG")
    bad_tar(tmp_path / "bad.tar", png.getvalue(), jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    cfg = DataConfig(shards=[str(tmp_path / "bad.tar"), str(tmp_path / "broken.tar"),
                             str(tmp_path / "missing.tar")], buckets=[[64, 64]], num_workers=0, shuffle_buffer=1)
    out, _, stats = collect(cfg, steps=12, batch_size=1)
    keys = Counter(s.key for _, (mb,) in out for s in mb)
    assert set(keys) <= {"good", "nosize", "badjson"} and len(keys) >= 2
    assert stats["corrupt_image"] >= 1 and stats["no_image_skipped"] >= 1
    assert stats["shard_read_error"] >= 1 and stats["metadata_invalid"] >= 1 and stats["caption_not_utf8"] >= 1


def test_only_unreadable_shards_stop_with_a_clear_error(tmp_path):
    cfg = DataConfig(shards=[str(tmp_path / "missing-{0..2}.tar")], buckets=[[64, 64]], num_workers=0)
    with pytest.raises(RuntimeError, match="16 shards in a row gave no readable sample"):
        collect(cfg, steps=1)
