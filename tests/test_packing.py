"""Packed micro-batches: samples of mixed sizes and tasks back to back in one fixed-length row predict and
score exactly as each does alone; token-budget planning; a short packed training run that resumes."""

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import drain_pipeline, quantized_pixels, train_tiny
from hidream_ft.config import ConfigError, DataConfig, DataStage, FolderSource, load_config
from hidream_ft.data import Sample, build_pipeline
from hidream_ft.data.demo import write_demo_dataset
from hidream_ft.data.collate import TrainCollator
from hidream_ft.data.planner import EpochPlanner, PackedSamples
from hidream_ft.flow.objective import diffusion_loss
from hidream_ft.model.conditioning import ConditionProcessor, condition_token_count
from hidream_ft.model.layout import REFERENCE_TYPE, TARGET_TYPE
from hidream_ft.model.patches import patchify
from hidream_ft.trainer import compute_loss

@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return ConditionProcessor.from_pretrained(tiny_checkpoint)


def mixed_samples() -> list[Sample]:
    """T2I of two sizes and prompt lengths, an edit (one reference) and an IP sample (two references)."""
    return [
        Sample(quantized_pixels(64, 64, 0), "a red circle", "t0", noise_seed=0, weight=1.0),
        Sample(quantized_pixels(64, 96, 1), "a green square on a blue background with a yellow triangle", "t1",
               noise_seed=1, weight=0.5),
        Sample(quantized_pixels(96, 64, 2), "add a hat", "e0", task="edit", references=[quantized_pixels(64, 96, 3)],
               noise_seed=2, weight=2.0),
        Sample(quantized_pixels(64, 64, 4), "the dog and the fox", "i0", task="ip",
               references=[quantized_pixels(64, 64, 5), quantized_pixels(32, 64, 6)], noise_seed=3, weight=1.0),
    ]


def collators(tokenizer, tokens, processor, row_tokens):
    """(the ordinary collator, one that packs a list of samples into a row of ``row_tokens``)"""
    collator = TrainCollator(tokenizer, tokens, 128, processor)
    return collator, lambda samples: collator(PackedSamples(samples, row_tokens))


def used_tokens(batch) -> int:
    return int((batch.layout.document_ids >= 0).sum())


def test_packed_row_holds_each_sample_as_it_is_alone(tokenizer, tokens, processor):
    single, packing = collators(tokenizer, tokens, processor, 2048)
    samples = mixed_samples()
    packed = packing(samples)
    assert packed.layout.input_ids.shape == (1, 2048) and packed.layout.attention_mask is not None
    assert packed.layout.target_counts == [4, 6, 6, 4] and packed.x0.shape == (20, 3072)
    assert packed.layout.image_counts == [4, 6, 12, 10]
    start = 0
    for index, sample in enumerate(samples):
        alone = single([sample]).layout
        length = alone.token_types.shape[1]
        row = slice(start, start + length)
        text = alone.input_ids.shape[1]
        assert (packed.layout.document_ids[0, row] == index).all()
        assert torch.equal(packed.layout.position_ids[:, :, row], alone.position_ids)
        assert torch.equal(packed.layout.token_types[:, row], alone.token_types)
        assert torch.equal(packed.layout.input_ids[:, start : start + text], alone.input_ids)
        start += length
    assert start == used_tokens(packed)
    assert (packed.layout.document_ids[0, start:] == -1).all() and not packed.layout.attention_mask[0, start:].any()
    assert torch.equal(packed.conditions.image_grid_thw, torch.cat([single([s]).conditions.image_grid_thw
                                                                    for s in samples[2:]]))


def test_vinputs_put_each_samples_references_after_its_own_target(tokenizer, tokens, processor):
    _, packing = collators(tokenizer, tokens, processor, 2048)
    packed = packing(mixed_samples())
    z = torch.arange(20.0)[:, None].expand(20, 3072)
    vinputs = packed.model_inputs(z)["vinputs"]
    references = packed.conditions.references
    assert vinputs.shape == (20 + 6 + 6, 3072)
    assert torch.equal(vinputs[:16], z[:16])  # t0, t1, then e0's target
    assert torch.equal(vinputs[16:22], references[:6])  # e0's reference
    assert torch.equal(vinputs[22:26], z[16:])  # i0's target
    assert torch.equal(vinputs[26:], references[6:])  # i0's two references
    slots = packed.layout.token_types[0]
    assert int(((slots == TARGET_TYPE) | (slots == REFERENCE_TYPE)).sum()) == vinputs.shape[0]


@pytest.mark.parametrize("attention", ["dense", "flex"])
def test_each_packed_prediction_equals_the_prediction_alone(attention, tiny_model, tokenizer, tokens, processor):
    tiny_model.attention = attention
    single, packing = collators(tokenizer, tokens, processor, 1024)
    samples = mixed_samples()
    packed = packing(samples)
    z = torch.randn(packed.x0.shape, generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor([0.1, 0.4, 0.7, 0.9])
    with torch.no_grad():
        together = tiny_model(**packed.model_inputs(z), timestep=timestep)
        assert together.shape == z.shape
        start = 0
        for index, sample in enumerate(samples):
            count = packed.layout.target_counts[index]
            alone_batch = single([sample])
            alone = tiny_model(**alone_batch.model_inputs(z[start : start + count][None]),
                               timestep=timestep[index : index + 1], output_tokens=count)
            torch.testing.assert_close(together[start : start + count], alone[0], rtol=0, atol=1e-6)
            start += count


@pytest.mark.parametrize("kind", ["x0", "velocity"])
def test_packed_loss_equals_the_unpacked_loss(kind, tiny_model, tokenizer, tokens, processor):
    tiny_model.attention = "dense"
    cfg = load_config(None, [f"diffusion.loss='{kind}'"])
    single, packing = collators(tokenizer, tokens, processor, 1024)
    samples = mixed_samples()
    with torch.no_grad():
        packed = compute_loss(tiny_model, packing(samples), cfg.diffusion)
        # Different shapes: one batch each (each already weighted by its sample's weight), averaged.
        alone = torch.stack([compute_loss(tiny_model, single([s]), cfg.diffusion) for s in samples])
        assert len({s.weight for s in samples}) > 1  # the weights take part
        torch.testing.assert_close(packed, alone.mean(), rtol=0, atol=1e-6)
        # Same shapes: the ordinary batch of the two 64x64 T2I samples and the same two packed.
        pair = [samples[0], Sample(quantized_pixels(64, 64, 9), "a yellow triangle", "t2", noise_seed=9)]
        torch.testing.assert_close(compute_loss(tiny_model, packing(pair), cfg.diffusion),
                                   compute_loss(tiny_model, single(pair), cfg.diffusion), rtol=0, atol=1e-6)


def test_packed_loss_reduces_per_sample():
    x0 = torch.zeros(5, 2)
    x_pred = torch.tensor([[1.0, 1.0], [1.0, 1.0], [3.0, 3.0], [3.0, 3.0], [3.0, 3.0]])
    sigmas = torch.tensor([0.5, 0.5])
    # sample 0: 2 tokens of error 1, sample 1: 3 tokens of error 9; each sample counts once, not per token
    assert diffusion_loss(x_pred, x0, sigmas, token_counts=[2, 3]).item() == 5.0
    weighted = diffusion_loss(x_pred, x0, sigmas, token_counts=[2, 3], sample_weights=torch.tensor([3.0, 1.0]))
    assert weighted.item() == (3 * 1 + 9) / 2


def test_samples_over_the_row_length_are_refused(tokenizer, tokens, processor):
    _, packing = collators(tokenizer, tokens, processor, 64)
    with pytest.raises(ValueError, match="over the packed row length 64"):
        packing(mixed_samples())


# -- token-budget planning -----------------------------------------------------------------------------------


def test_planner_fills_micro_batches_to_the_budget_in_epoch_order_and_resumes():
    repeats = np.array([1, 2, 1, 1, 1, 1, 1, 1, 1, 1])
    costs = np.array([30, 50, 20, 70, 10, 40, 60, 25, 35, 45])
    assignment = np.array([0, 1, 0, 2, 1, 0, -1, 2, 1, 0])  # item 6 is not used in this stage
    budget = 100

    def planner(position=None):
        planner = EpochPlanner(repeats, seed=3, **(position or {}))
        planner.set_stage(assignment, batch_size=1, costs=costs, max_tokens=budget)
        return planner

    first, batches = planner(), []
    while sum(len(b.items) for b in batches) < 2 * 10:  # two epochs of the 10 used entries
        batches.append(first.next_batch())
    for batch in batches:
        assert sum(costs[i] for i in batch.items) <= budget
        assert batch.buckets == tuple(int(assignment[i]) for i in batch.items)
    assert len({b for batch in batches for b in batch.buckets}) == 3  # micro-batches mix buckets
    assert any(len(set(batch.buckets)) > 1 for batch in batches)
    epoch0 = [b for b in batches if b.epoch == 0]
    expected = [0, 1, 1, 2, 3, 4, 5, 7, 8, 9]
    assert sorted(i for b in epoch0 for i in b.items) == expected  # every used entry exactly once
    assert sorted(i for b in batches if b.epoch == 1 for i in b.items) == expected
    # Greedy in draw order: a micro-batch ends only where the next entry would overflow it, or the epoch ends.
    for batch, after in zip(epoch0, epoch0[1:]):
        assert sum(costs[i] for i in batch.items) + costs[after.items[0]] > budget
        assert batch.positions[-1] < after.positions[0]
    # Exact resume from any saved position.
    replay = planner()
    for index in range(len(batches) - 1):
        replay.next_batch()
        resumed = planner(replay.position())
        assert [resumed.next_batch() for _ in range(len(batches) - index - 1)] == batches[index + 1 :]


def test_a_batch_size_stage_and_a_packing_stage_hand_over_their_queued_entries():
    repeats = np.ones(12, dtype=int)
    assignment = np.array([0, 1] * 6)
    costs = np.full(12, 10)
    planner = EpochPlanner(repeats, seed=0)
    planner.set_stage(assignment, batch_size=4)
    taken = list(planner.next_batch().items)
    queued = planner.position()["pending"]
    assert queued  # entries of the other bucket wait in their queue
    planner.set_stage(assignment, batch_size=4, costs=costs, max_tokens=25)
    rest = []
    while planner.position()["epoch"] == 0:
        batch = planner.next_batch()
        if batch.epoch:
            break
        assert len(batch.items) <= 2
        rest += batch.items
    assert sorted(taken + rest) == list(range(12))


@pytest.fixture(scope="module")
def mixed_folders(tmp_path_factory):
    """Square, wide and tall text-to-image folders and one edit folder (control images of two sizes)."""
    root = tmp_path_factory.mktemp("packing")
    for name, size in {"square": (64, 64), "wide": (96, 64), "tall": (64, 96)}.items():
        write_demo_dataset(root / name, n=4, size=size)
    write_demo_dataset(root / "edit", n=3, size=(64, 64))
    (root / "source").mkdir()
    for index in range(3):
        Image.new("RGB", (128, 64) if index else (64, 64), (30, 80 * index, 200)).save(
            root / "source" / f"demo_{index:03d}.png")
    return root


def packing_config(root, **overrides):
    folders = [str(root / "square"), str(root / "wide"), str(root / "tall"),
               FolderSource(str(root / "edit"), control_dir=str(root / "source"))]
    return DataConfig(**{"folders": folders, "buckets": [[64, 64], [96, 64], [64, 96]], "num_workers": 0,
                         "max_text_tokens": 48, "max_tokens": 256, **overrides})


def test_pipeline_packs_every_sample_once_per_epoch_on_equal_micro_batch_counts(mixed_folders, tokenizer, tokens,
                                                                                processor):
    cfg = packing_config(mixed_folders, num_workers=2)
    collate = TrainCollator(tokenizer, tokens, cfg.max_text_tokens, processor)
    per_rank = [drain_pipeline(cfg, steps=4, grad_accum=2, rank=rank, world_size=2, collate=collate)[0]
                for rank in (0, 1)]
    drawn, sizes = [], []
    for step in range(4):
        for rank in (0, 1):
            _, micro_batches = per_rank[rank][step]
            assert len(micro_batches) == 2  # collectives pair up: every rank has grad_accum micro-batches
            for batch in micro_batches:  # packed by the trainer's collate: a row over 256 tokens would raise
                assert batch.layout.input_ids.shape == (1, 256) and 0 < used_tokens(batch) <= 256
                assert len(batch.layout.target_counts) == batch.size == batch.weights.shape[0]
                drawn += batch.keys
                sizes.append(batch.size)
    epoch = [f"{name}/demo_{i:03d}" for name in ("square", "wide", "tall") for i in range(4)]
    epoch += [f"edit/demo_{i:03d}" for i in range(3)]
    assert len(drawn) >= len(epoch) and sorted(drawn[: len(epoch)]) == sorted(epoch)
    assert max(sizes) >= 4  # text-to-image samples of 52-54 tokens share a row
    mixed = [b for step in per_rank for _, mbs in step for b in mbs if b.conditions is not None and b.size > 1]
    assert mixed  # an edit sample rides in a row with text-to-image ones


def test_packed_pipeline_resumes_exactly(mixed_folders):
    cfg = packing_config(mixed_folders, num_workers=2, crop="random", caption_dropout=0.3)
    full, states, _ = drain_pipeline(cfg, steps=7, grad_accum=2)
    resumed, _, _ = drain_pipeline(cfg, steps=4, start_step=3, grad_accum=2, state=states[2])
    assert [step for step, _ in resumed] == [step for step, _ in full[3:]]
    for (_, ours), (_, theirs) in zip(full[3:], resumed):
        assert [[s.key for s in mb] for mb in ours] == [[s.key for s in mb] for mb in theirs]
        for mb_a, mb_b in zip(ours, theirs):
            for a, b in zip(mb_a, mb_b):
                assert a.noise_seed == b.noise_seed and a.caption == b.caption and torch.equal(a.pixels, b.pixels)


def test_progressive_stages_switch_between_packing_and_batch_sizes_and_resume(mixed_folders):
    cfg = packing_config(mixed_folders, max_tokens=0, stages=[
        DataStage(until_step=2, buckets=[[64, 32], [32, 64]], max_tokens=200),  # 50 tokens a T2I sample
        DataStage(until_step=4, batch_size=2),
        DataStage(max_tokens=256),
    ])
    full, states, _ = drain_pipeline(cfg, steps=6)
    kinds = [(type(mb).__name__, getattr(mb, "row_tokens", None)) for _, (mb,) in full]
    assert kinds == [("PackedSamples", 200)] * 2 + [("list", None)] * 2 + [("PackedSamples", 256)] * 2
    # 48 + 2 + 4 + 146 = 200 planned tokens for an edit sample (ViT tokens included) fill a row alone; four
    # text-to-image samples of 50 fill the next.
    assert [[s.task for s in mb] for _, (mb,) in full[:2]] == [["edit"], ["t2i"] * 4]
    assert all(len(mb) <= 2 and len({s.pixels.shape for s in mb}) == 1 for _, (mb,) in full[2:4])
    for saved in (0, 1, 3):
        resumed, _, _ = drain_pipeline(cfg, steps=5 - saved, start_step=saved + 1, state=states[saved])
        assert [[s.key for s in mb] for _, (mb,) in resumed] == [[s.key for s in mb] for _, (mb,) in full[saved + 1 :]]


def test_a_sample_over_the_budget_is_a_config_error_naming_its_bucket(mixed_folders):
    with pytest.raises(ConfigError, match=r"a sample of bucket 96x64 takes up to 54 tokens .* over max_tokens = 53"):
        build_pipeline(packing_config(mixed_folders, folders=[str(mixed_folders / "wide")], max_tokens=53))
    build_pipeline(packing_config(mixed_folders, folders=[str(mixed_folders / "wide")], max_tokens=54))
    with pytest.raises(ConfigError, match="packed micro-batches are planned for data.folders only"):
        DataConfig(shards=["x.tar"], max_tokens=100).validate("data")
    with pytest.raises(ConfigError, match=r"data.stages\[0\]: set either batch_size or max_tokens"):
        DataConfig(stages=[DataStage(batch_size=2, max_tokens=100)]).validate("data")


def test_packed_training_run_trains_and_resumes_exactly(tiny_checkpoint, tmp_path, mixed_folders):
    root = mixed_folders
    folders = (f"data.folders=['{root / 'square'}', '{root / 'wide'}', '{root / 'tall'}', "
               f"{{path='{root / 'edit'}', control_dir='{root / 'source'}'}}]")

    def train(output, steps):
        return train_tiny(tiny_checkpoint, tmp_path / output, steps, "logging.tensorboard=false",
                          "data.buckets=[[64, 64], [96, 64], [64, 96]]", "data.max_tokens=256", folders)

    full = train("full", 4)
    assert full["step"] == 4 and full["skipped"] == 0 and sorted(full["history"]) == [1, 2, 3, 4]
    assert all(np.isfinite(loss) for loss in full["history"].values())
    train("resumed", 2)
    resumed = train("resumed", 4)
    assert resumed["step"] == 4 and sorted(resumed["history"]) == [3, 4]
    for step in (3, 4):
        assert resumed["history"][step] == pytest.approx(full["history"][step], rel=1e-6, abs=0)


def test_planned_vit_tokens_are_the_processors(processor):
    for count, sizes in [(1, [(96, 64)]), (2, [(64, 64), (64, 32)]), (3, [(32, 96)] * 3)]:
        references = [quantized_pixels(h, w, 0) for w, h in sizes]
        assert processor(references).token_counts == [condition_token_count(count, w, h) for w, h in sizes]


# -- uint8 input path ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True])
def test_targets_cross_as_8_bit_codes_and_normalise_to_the_same_float_pixels(tokenizer, tokens, processor, packed):
    single, packing = collators(tokenizer, tokens, processor, 512)
    samples = mixed_samples()[:1] + [Sample(quantized_pixels(64, 64, 7), "a yellow triangle", "t2", noise_seed=7)]
    batch = (packing if packed else single)(samples)
    assert batch.target.dtype == torch.uint8
    expected = [patchify(s.pixels[None])[0] for s in samples]
    expected = torch.cat(expected) if packed else torch.stack(expected)
    assert batch.x0.dtype == torch.float32 and torch.equal(batch.x0, expected)
    moved = batch.to("cpu")
    assert moved.target.dtype == torch.uint8 and torch.equal(moved.x0, expected)
    assert batch.target_tokens == 8


def test_pixels_that_are_not_8_bit_values_stay_float(tokenizer, tokens, processor):
    single, _ = collators(tokenizer, tokens, processor, 512)
    sample = Sample(torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1, "a red circle", "n")
    batch = single([sample])
    assert batch.target.dtype == torch.float32 and torch.equal(batch.x0, patchify(sample.pixels[None]))
