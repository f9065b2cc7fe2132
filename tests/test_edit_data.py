"""Paired data: control folders and ref members of shards, K-rule sizing, shape-grouped batches, bad input."""

import io
from collections import Counter

import pytest
import webdataset as wds
from PIL import Image

from hidream_ft.config import ConfigError, DataConfig, FolderSource, load_config
from hidream_ft.data import build_pipeline
from hidream_ft.data.demo import write_demo_dataset
from hidream_ft.data.paired import reference_members

BUCKETS = [[128, 128]]


def control(path, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """t2i: 4 images; edit: 4 targets, controls for 3 (two 2:1, one 1:2, any extension); ip: 3 targets with
    two control folders."""
    root = tmp_path_factory.mktemp("paired")
    write_demo_dataset(root / "t2i", n=4, size=(128, 128))
    write_demo_dataset(root / "edit" / "target", n=4, size=(128, 128))
    for index, size in enumerate([(256, 128), (256, 128), (128, 256)]):
        control(root / "edit" / "source" / f"demo_{index:03d}.jpg", size, (200, 20 * index, 0))
    write_demo_dataset(root / "ip" / "target", n=3, size=(128, 128))
    for index in range(3):
        control(root / "ip" / "person" / f"demo_{index:03d}.png", (128, 128), (0, 90, 20 * index))
        control(root / "ip" / "garment" / f"demo_{index:03d}.png", (128, 128), (20 * index, 0, 90))
    return root


def folder_config(root, **overrides):
    folders = [
        FolderSource(str(root / "t2i")),
        FolderSource(str(root / "edit" / "target"), control_dir=str(root / "edit" / "source")),
        FolderSource(str(root / "ip" / "target"), control_dirs=[str(root / "ip" / "person"),
                                                                str(root / "ip" / "garment")]),
    ]
    return DataConfig(**{"folders": folders, "buckets": BUCKETS, "num_workers": 0, **overrides})


def micro_batches(cfg, steps, batch_size=2):
    pipeline = build_pipeline(cfg, seed=1, default_batch_size=batch_size)
    out = []
    iterator = pipeline.iterate()
    for _, batches in iterator:
        out += batches
        if len(out) == steps:
            break
    iterator.close()
    return out, pipeline.stats()


def shape(sample):
    return tuple(sample.pixels.shape), tuple(tuple(r.shape) for r in sample.references)


def test_folder_epoch_mixes_tasks_in_single_shape_batches(dataset):
    cfg = folder_config(dataset, task_weights={"edit": 2.0, "t2i": 0.5})
    # t2i: 2 batches; edit 2:1 controls: 1; edit 1:2: 1 (short); ip: 2 (one short) → one epoch is 6 batches.
    batches, stats = micro_batches(cfg, steps=6)
    seen = Counter(s.key for batch in batches for s in batch)
    assert len(seen) == 10 and set(seen.values()) == {1}  # every usable target once; edit/demo_003 lacks a control
    assert "edit/target/demo_003" not in seen and stats["control_missing_skipped"] == 1
    for batch in batches:
        assert len({shape(s) for s in batch}) == 1 and len({s.task for s in batch}) == 1
    samples = {s.key: s for batch in batches for s in batch}
    wide, tall = samples["edit/target/demo_000"], samples["edit/target/demo_002"]
    # K = 1 → S = 128: 256x128 → 181x91 → floored to 160x64; the aspect is kept, nothing is cropped to square.
    assert (wide.task, [tuple(r.shape) for r in wide.references]) == ("edit", [(3, 64, 160)])
    assert [tuple(r.shape) for r in tall.references] == [(3, 160, 64)]
    assert wide.weight == 2.0 and samples["t2i/demo_000"].weight == 0.5
    ip = samples["ip/target/demo_001"]
    assert ip.task == "ip" and [tuple(r.shape) for r in ip.references] == [(3, 96, 96)] * 2  # K = 2 → S = 96
    assert ip.references[0][:, 0, 0].tolist() == pytest.approx([-1.0, 90 / 127.5 - 1, 20 / 127.5 - 1])
    assert samples["t2i/demo_000"].references == [] and samples["t2i/demo_000"].task == "t2i"


def test_missing_control_can_stop_the_run(dataset):
    with pytest.raises(ConfigError, match=r"data.folders\[1\]: .*demo_003.png: no control image named demo_003\.\* "
                                          r"in .*source \(data.missing_control = 'error'\)"):
        build_pipeline(folder_config(dataset, missing_control="error"))


def test_control_folder_settings_are_checked(dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"data.folders\[0\]: set either control_dir or control_dirs, not both"):
        load_config(None, ["data.folders=[{path='a', control_dir='b', control_dirs=['c']}]"])
    with pytest.raises(ConfigError, match=r"data.folders\[0\].task: 'ip' needs control_dir or control_dirs"):
        load_config(None, ["data.folders=[{path='a', task='ip'}]"])
    with pytest.raises(ConfigError, match=r"data.task_weights: unknown task 'edits'"):
        load_config(None, ["data.task_weights={edits=1.0}"])
    too_many = DataConfig(folders=[FolderSource(str(dataset / "ip" / "target"),
                                                control_dirs=[str(dataset / "ip" / "person")] * 11)],
                          buckets=BUCKETS, num_workers=0)
    with pytest.raises(ConfigError, match=r"data.folders\[0\]: 11 control folders; at most 10"):
        build_pipeline(too_many)
    absent = DataConfig(folders=[FolderSource(str(dataset / "t2i"), control_dir=str(tmp_path / "nowhere"))],
                        buckets=BUCKETS, num_workers=0)
    with pytest.raises(ConfigError, match=r"data.folders\[0\].control_dirs\[0\]: .*nowhere' is not a directory"):
        build_pipeline(absent)


# ---------------------------------------------------------------- shards


def png(size, colour=(10, 200, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("paired-shards") / "paired-000000.tar"
    target = png((128, 128))
    samples = [
        {"__key__": "plain", "png": target, "txt": "a green square"},
        {"__key__": "edit", "png": target, "txt": "make it red", "ref0.png": png((256, 128))},
        {"__key__": "edit2", "png": target, "txt": "make it blue", "ref0.jpg": png((256, 128))},
        {"__key__": "ip", "png": target, "txt": "both", "ref0.png": png((128, 128)), "ref1.png": png((128, 128)),
         "json": b'{"task": "ip"}'},
        {"__key__": "gap", "png": target, "txt": "x", "ref0.png": png((128, 128)), "ref2.png": png((128, 128))},
        {"__key__": "many", "png": target, "txt": "x", **{f"ref{i}.png": png((64, 64)) for i in range(11)}},
        {"__key__": "broken", "png": target, "txt": "x", "ref0.png": b"not an image"},
    ]
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def test_shard_references_are_read_grouped_and_bad_ones_counted(shard):
    cfg = DataConfig(shards=[str(shard)], buckets=BUCKETS, num_workers=0, shuffle_buffer=2)
    batches, stats = micro_batches(cfg, steps=12)
    keys = {s.key for batch in batches for s in batch}
    assert keys == {"plain", "edit", "edit2", "ip"}
    for batch in batches:
        assert len({shape(s) for s in batch}) == 1
    by_key = {s.key: s for batch in batches for s in batch}
    assert by_key["edit"].task == "edit" and [tuple(r.shape) for r in by_key["edit"].references] == [(3, 64, 160)]
    assert by_key["ip"].task == "ip" and len(by_key["ip"].references) == 2
    assert any(len(batch) == 2 and {s.key for s in batch} == {"edit", "edit2"} for batch in batches)
    assert stats["metadata_invalid"] > 0 and stats["too_many_references"] > 0 and stats["corrupt_image"] > 0


def test_reference_member_numbering():
    assert reference_members({"jpg": b"", "ref1.png": b"", "ref0.JPG": b"", "json": b""}) == ["ref0.JPG", "ref1.png"]
    with pytest.raises(ValueError, match="without gaps"):
        reference_members({"ref1.png": b""})
    with pytest.raises(ValueError, match="two images for reference 0"):
        reference_members({"ref0.png": b"", "ref0.jpg": b""})
