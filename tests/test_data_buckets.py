"""Buckets, crop boxes, stages and the data section of the config."""

import math
from pathlib import Path

import pytest

from hidream_ft.config import ConfigError, DataConfig, DataStage, FolderSource, load_config
from hidream_ft.data.buckets import (
    assign_buckets,
    buckets_for_area,
    crop_box,
    resolve_stages,
    stage_at,
)

SMALL = [(64, 64), (96, 64), (64, 96), (128, 64)]


def nearest_bucket(width, height, buckets):
    index, _ = assign_buckets([width], [height], buckets)
    return buckets[int(index[0])]


def test_generated_buckets_are_patch_multiples_close_to_the_area():
    area = 1024 * 1024
    buckets = buckets_for_area(area)
    assert (1024, 1024) in buckets and (1344, 768) in buckets and (768, 1344) in buckets
    for width, height in buckets:
        assert width % 32 == 0 and height % 32 == 0
        assert width * height <= area
        assert width * height >= area - 32 * max(width, height)  # the tallest height that fits was taken
        assert max(width / height, height / width) <= 2.5
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)
    assert set(buckets) == {(h, w) for w, h in buckets}  # every landscape bucket has its portrait twin
    assert len(buckets) == 23 and buckets[0] == (672, 1536)


def test_bucket_step_and_max_aspect_limit_the_list():
    coarse = buckets_for_area(1024 * 1024, step=64, max_aspect=1.5)
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in coarse)
    assert all(max(w / h, h / w) <= 1.5 for w, h in coarse)
    assert len(coarse) < len(buckets_for_area(1024 * 1024))
    assert buckets_for_area(64 * 64) == [(64, 64)]


@pytest.mark.parametrize(
    "size, bucket, box",
    [
        ((100, 100), (64, 64), (0, 0, 100, 100)),
        ((150, 100), (96, 64), (0, 0, 150, 100)),  # exact aspect: nothing cropped
        ((300, 100), (128, 64), (50, 0, 250, 100)),  # 3:1 → 2:1 is less distortion than 3:2
        ((100, 150), (64, 96), (0, 0, 100, 150)),
        ((120, 100), (64, 64), (10, 0, 110, 100)),  # 1.2 is closer to 1:1 than to 3:2 in log ratio
        ((100, 130), (64, 96), (6.666667, 0, 93.333333, 130)),  # 1.3 tall: closer to 2:3 than 1:1
        ((40, 40), (64, 64), (0, 0, 40, 40)),  # too small: upscaled, whole image
    ],
)
def test_nearest_bucket_and_centre_crop(size, bucket, box):
    assert nearest_bucket(*size, SMALL) == bucket
    assert crop_box(*size, bucket) == pytest.approx(box, abs=1e-5)


def test_1080p_photo_at_1024_area():
    bucket = nearest_bucket(1920, 1080, buckets_for_area(1024 * 1024))
    assert bucket == (1344, 768)  # 1.75 vs 16:9 = 1.778; next is 1376x736 = 1.87
    left, top, right, bottom = crop_box(1920, 1080, bucket)
    assert (top, bottom) == (0, 1080)
    assert right - left == pytest.approx(1080 * 1344 / 768)
    assert left == pytest.approx((1920 - 1890) / 2)


def test_equal_aspect_buckets_prefer_the_largest_that_needs_no_upscaling():
    buckets = [(64, 64), (128, 128)]
    assert nearest_bucket(200, 200, buckets) == (128, 128)
    assert nearest_bucket(100, 100, buckets) == (64, 64)
    assert nearest_bucket(50, 50, buckets) == (64, 64)  # both upscale: the least
    index, upscale = assign_buckets([200, 100, 50], [200, 100, 50], buckets)
    assert list(index) == [1, 0, 0] and list(upscale) == [False, False, True]


def test_assignment_is_symmetric_for_portrait_and_landscape():
    buckets = buckets_for_area(512 * 512)
    for width, height in [(1000, 700), (1600, 900), (3000, 1000)]:
        landscape = nearest_bucket(width, height, buckets)
        assert nearest_bucket(height, width, buckets) == (landscape[1], landscape[0])


def test_random_crop_offset_moves_the_box_along_the_slack_axis():
    assert crop_box(300, 100, (128, 64), offset=0.0) == pytest.approx((0, 0, 200, 100))
    assert crop_box(300, 100, (128, 64), offset=1.0) == pytest.approx((100, 0, 300, 100))
    assert crop_box(100, 300, (64, 64), offset=1.0) == pytest.approx((0, 200, 100, 300))


def _write(tmp_path, text):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_bucket_not_a_multiple_of_32_is_a_config_error_naming_it(tmp_path):
    path = _write(tmp_path, "[data]\nbuckets = [[1024, 1024], [1000, 1024]]\n")
    with pytest.raises(ConfigError, match=r"data\.buckets\[1\]: bucket \[1000, 1024\] is not a multiple of 32"):
        load_config(path)
    path = _write(tmp_path, "[[data.stages]]\nbuckets = [[64, 70]]\n")
    with pytest.raises(ConfigError, match=r"data\.stages\[0\]\.buckets\[0\]: bucket \[64, 70\]"):
        load_config(path)


def test_folders_accept_strings_and_tables(tmp_path):
    path = _write(
        tmp_path,
        '[data]\nfolders = ["/a", { path = "/b", num_repeats = 3 }]\n',
    )
    cfg = load_config(path).data
    assert cfg.folders == [FolderSource("/a", 1), FolderSource("/b", 3)]
    path = _write(tmp_path, '[[data.folders]]\npath = "/c"\nnum_repeats = 0\n')
    with pytest.raises(ConfigError, match=r"data\.folders\[0\]\.num_repeats: must be at least 1"):
        load_config(path)
    path = _write(tmp_path, '[[data.folders]]\npath = "/c"\nrepeats = 2\n')
    with pytest.raises(ConfigError, match="did you mean 'num_repeats'"):
        load_config(path)


def test_folders_and_shards_together_are_rejected(tmp_path):
    path = _write(tmp_path, '[data]\nfolders = ["/a"]\nshards = ["/s/shard-{000000..000003}.tar"]\n')
    with pytest.raises(ConfigError, match="either folders or shards"):
        load_config(path)


@pytest.mark.parametrize(
    "toml, message",
    [
        ("[data]\ncaption_dropout = 1.5\n", r"data\.caption_dropout: must be between 0.0 and 1.0"),
        ("[data]\nbucket_step = 48\n", r"data\.bucket_step: must be a multiple of 32"),
        ("[data]\nnum_workers = -1\n", r"data\.num_workers: must be at least 0"),
        ('[data]\ncrop = "left"\n', r"data\.crop: 'left' is not one of 'center', 'random'"),
        ("[[data.stages]]\narea = 4096\n[[data.stages]]\narea = 8192\n", r"data\.stages\[0\]\.until_step: required"),
        (
            "[[data.stages]]\nuntil_step = 10\n[[data.stages]]\nuntil_step = 5\n[[data.stages]]\n",
            r"data\.stages\[1\]\.until_step: 5 must be greater than the previous stage's 10",
        ),
        ("[[data.stages]]\narea = 4096\nbuckets = [[64, 64]]\n", r"data\.stages\[0\]: set either area or buckets"),
        ("[[data.stages]]\nbatch_size = 0\n", r"data\.stages\[0\]\.batch_size: must be at least 1"),
    ],
)
def test_invalid_data_config(tmp_path, toml, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, toml))


def test_stages_resolve_buckets_batch_sizes_and_boundaries(tmp_path):
    path = _write(
        tmp_path,
        "[data]\narea = 16384\n"
        "[[data.stages]]\nuntil_step = 100\narea = 4096\nbatch_size = 8\n"
        "[[data.stages]]\nuntil_step = 300\nbuckets = [[128, 128], [192, 96]]\n"
        "[[data.stages]]\nuntil_step = 500\n",
    )
    stages = resolve_stages(load_config(path).data, default_batch_size=2)
    assert [(s.first_step, s.until_step, s.batch_size) for s in stages] == [(0, 100, 8), (100, 300, 2), (300, None, 2)]
    assert stages[0].buckets == tuple(buckets_for_area(4096))
    assert stages[1].buckets == ((128, 128), (192, 96))
    assert stages[2].buckets == tuple(buckets_for_area(16384))  # inherits the top-level area
    assert [stage_at(stages, step).index for step in (0, 99, 100, 299, 300, 10**6)] == [0, 0, 1, 1, 2, 2]


def test_without_stages_one_stage_uses_top_level_buckets_and_the_trainer_batch_size():
    (stage,) = resolve_stages(DataConfig(buckets=[[64, 64], [96, 64]]), default_batch_size=3)
    assert stage.buckets == ((64, 64), (96, 64)) and stage.batch_size == 3 and stage.until_step is None
    (stage,) = resolve_stages(DataConfig(), default_batch_size=1)
    assert stage.buckets == tuple(buckets_for_area(1024 * 1024))
    assert all(math.prod(b) <= 1024 * 1024 for b in stage.buckets)


def test_stage_validation_also_runs_for_directly_built_configs():
    cfg = DataConfig(folders=["/a"], stages=[DataStage(area=4096), DataStage(area=8192)])
    with pytest.raises(ConfigError, match=r"data\.stages\[0\]\.until_step"):
        cfg.validate("data")


@pytest.mark.parametrize("name", ["data_folders.toml", "data_shards.toml"])
def test_example_configs_load(name):
    cfg = load_config(Path(__file__).parents[1] / "configs" / name).data
    cfg.validate("data")
    stages = resolve_stages(cfg, default_batch_size=2)
    assert all(w % 32 == 0 and h % 32 == 0 for stage in stages for w, h in stage.buckets)
