"""Folder pipeline: exactly-once epochs across ranks and workers, exact resume, stage switching."""

import signal
from collections import Counter

import pytest
import torch

from helpers import drain_pipeline
from hidream_ft.config import DataConfig, DataStage, FolderSource
from hidream_ft.data import Sample, build_pipeline
from hidream_ft.data.demo import write_demo_dataset

ASPECTS = {"square": (64, 64), "wide": (96, 64), "tall": (64, 96)}
BUCKETS = [[64, 64], [96, 64], [64, 96]]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Three folders of 5 demo images each, one per aspect ratio (keys like 'wide/demo_003')."""
    root = tmp_path_factory.mktemp("mixed")
    for name, size in ASPECTS.items():
        write_demo_dataset(root / name, n=5, size=size)
    return root


def stack_pixels(samples: list[Sample]) -> dict:
    """A collate like a trainer's: one tensor per micro-batch (buckets never mix, so shapes agree)."""
    return {"pixels": torch.stack([s.pixels for s in samples]), "keys": [s.key for s in samples],
            "captions": [s.caption for s in samples]}


def keys(micro_batch):
    return [s.key for s in micro_batch]


def test_two_ranks_two_workers_see_every_sample_exactly_once_per_epoch(mixed):
    folders = [FolderSource(str(mixed / "square"), num_repeats=2), str(mixed / "wide"), str(mixed / "tall")]
    cfg = DataConfig(folders=folders, buckets=BUCKETS, num_workers=2)
    per_rank = [drain_pipeline(cfg, steps=12, grad_accum=2, rank=rank, world_size=2)[0] for rank in (0, 1)]
    assert [step for step, _ in per_rank[0]] == [step for step, _ in per_rank[1]] == list(range(12))
    global_order = []
    for step in range(12):
        for rank in (0, 1):
            _, micro_batches = per_rank[rank][step]
            assert len(micro_batches) == 2
            for micro_batch in micro_batches:
                assert 1 <= len(micro_batch) <= 2
                assert len({tuple(s.pixels.shape) for s in micro_batch}) == 1  # one bucket per micro-batch
                global_order += keys(micro_batch)
    expected = Counter({f"square/demo_{i:03d}": 2 for i in range(5)})
    expected.update(f"{name}/demo_{i:03d}" for name in ("wide", "tall") for i in range(5))
    epoch = sum(expected.values())  # 20 entries
    assert len(global_order) >= 2 * epoch
    assert Counter(global_order[:epoch]) == expected
    assert Counter(global_order[epoch : 2 * epoch]) == expected
    assert global_order[:epoch] != global_order[epoch : 2 * epoch]  # each epoch has its own order


def test_samples_are_in_their_bucket_with_the_configured_batch_size(mixed):
    cfg = DataConfig(folders=[str(mixed)], buckets=BUCKETS, num_workers=0)
    out, _, _ = drain_pipeline(cfg, steps=8, batch_size=3, collate=stack_pixels)
    for _, (batch,) in out:
        pixels = batch["pixels"]
        assert pixels.dtype == torch.float32 and pixels.shape[0] <= 3
        height, width = pixels.shape[2:]
        assert [width, height] in BUCKETS
        for key in batch["keys"]:
            assert ASPECTS[key.split("/")[0]] == (width, height)
        assert -1.0 <= pixels.min().item() and pixels.max().item() <= 1.0
        for key, caption in zip(batch["keys"], batch["captions"]):
            assert caption.startswith("a ") or caption.startswith("an ")


def outputs_equal(a, b):
    """Same steps, same keys, captions and pixels."""
    assert [step for step, _ in a] == [step for step, _ in b]
    for (_, micro_a), (_, micro_b) in zip(a, b):
        assert [keys(m) for m in micro_a] == [keys(m) for m in micro_b]
        for mb_a, mb_b in zip(micro_a, micro_b):
            for x, y in zip(mb_a, mb_b):
                assert (x.caption, x.noise_seed) == (y.caption, y.noise_seed)
                assert torch.equal(x.pixels, y.pixels)


def randomised(mixed, workers):
    return DataConfig(folders=[str(mixed)], buckets=BUCKETS, num_workers=workers, crop="random",
                      caption_dropout=0.3, shuffle_tags=True, trigger="sks")


def test_resume_mid_epoch_continues_with_the_next_unseen_sample(mixed):
    cfg = randomised(mixed, workers=2)
    full, states, _ = drain_pipeline(cfg, steps=8, grad_accum=2)
    resumed, _, _ = drain_pipeline(cfg, steps=5, start_step=3, grad_accum=2, state=states[2])
    outputs_equal(full[3:], resumed)
    assert states[2]["next_step"] == 3 and states[2]["epoch"] == 0 and 0 < states[2]["cursor"] < 15
    seen_before = [k for _, mbs in full[:3] for m in mbs for k in keys(m)]
    assert len(seen_before) == len(set(seen_before))  # nothing repeats inside the epoch
    noise_seeds = [s.noise_seed for _, mbs in full for m in mbs for s in m]
    assert len(set(noise_seeds)) == len(noise_seeds)  # every draw, repeats of an image included, has its own


def test_worker_count_does_not_change_the_data(mixed):
    outputs_equal(drain_pipeline(randomised(mixed, 0), steps=6, grad_accum=3)[0],
                  drain_pipeline(randomised(mixed, 2), steps=6, grad_accum=3)[0])


def test_resume_without_saved_state_replays_the_plan(mixed):
    cfg = randomised(mixed, workers=0)
    full, _, _ = drain_pipeline(cfg, steps=9)
    replayed, _, _ = drain_pipeline(cfg, steps=3, start_step=6)
    outputs_equal(full[6:], replayed)


def test_state_is_small_identical_on_all_ranks_and_refuses_going_back(mixed):
    cfg = DataConfig(folders=[str(mixed)], buckets=BUCKETS, num_workers=0)
    _, states0, _ = drain_pipeline(cfg, steps=4, rank=0, world_size=2)
    _, states1, _ = drain_pipeline(cfg, steps=4, rank=1, world_size=2)
    strip = lambda state: {k: v for k, v in state.items() if k != "stats"}  # noqa: E731
    assert strip(states0[-1]) == strip(states1[-1])
    assert len(repr(states0[-1])) < 2000
    with pytest.raises(ValueError, match="start_step 2 is before the data position"):
        drain_pipeline(cfg, steps=1, start_step=2, state=states0[-1], rank=0, world_size=2)


def test_stages_switch_at_their_step_including_after_a_resume(mixed):
    cfg = DataConfig(
        folders=[str(mixed)],
        buckets=BUCKETS,
        num_workers=2,
        stages=[
            DataStage(until_step=3, buckets=[[32, 32]], batch_size=1),
            DataStage(until_step=7, batch_size=3),  # top-level buckets, 3 per micro-batch
            DataStage(buckets=[[64, 64]], batch_size=2),
        ],
    )
    full, states, _ = drain_pipeline(cfg, steps=10)
    shapes = [{tuple(s.pixels.shape[1:]) for s in mb} for _, (mb,) in full]
    sizes = [len(mb) for _, (mb,) in full]
    assert shapes[:3] == [{(32, 32)}] * 3 and sizes[:3] == [1, 1, 1]
    assert all(len(s) == 1 and next(iter(s)) in {(64, 64), (64, 96), (96, 64)} for s in shapes[3:7])
    assert all(1 <= n <= 3 for n in sizes[3:7]) and 3 in sizes[3:7]
    assert shapes[7:] == [{(64, 64)}] * 3 and all(n <= 2 for n in sizes[7:])
    for saved in (1, 4, 6):  # resume inside stage 0, inside stage 1, and on the step before a switch
        resumed, _, _ = drain_pipeline(cfg, steps=9 - saved, start_step=saved + 1, state=states[saved])
        outputs_equal(full[saved + 1 :], resumed)


def sigterm_handler(samples: list[Sample]):
    """A collate that reports how the DataLoader worker it runs in handles SIGTERM."""
    return signal.getsignal(signal.SIGTERM)


def test_workers_ignore_preemption_signals(mixed):
    cfg = DataConfig(folders=[str(mixed)], buckets=BUCKETS, num_workers=2)
    out, _, _ = drain_pipeline(cfg, steps=2, collate=sigterm_handler)
    assert [handler for _, (handler,) in out] == [signal.SIG_IGN, signal.SIG_IGN]


def test_default_rank_and_world_without_torch_distributed(mixed):
    assert not torch.distributed.is_initialized()
    pipeline = build_pipeline(DataConfig(folders=[str(mixed)], buckets=BUCKETS, num_workers=0))
    assert (pipeline.rank, pipeline.world_size) == (0, 1)
    step, (batch,) = next(pipeline.iterate())
    assert step == 0 and isinstance(batch[0], Sample) and batch[0].task == "t2i" and batch[0].references == []
    stats = pipeline.stats()
    assert set(stats) >= {"corrupt_image", "too_small_skipped", "caption_not_utf8"}
    assert all(isinstance(v, int) for v in stats.values())
