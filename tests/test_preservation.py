"""Preserving the base model: regularization images mixed in at a ratio with their own loss weight, and LoRA
prior preservation against the model with its adapter disabled."""

from collections import Counter

import numpy as np
import pytest
import torch

from helpers import drain_pipeline
from hidream_ft.config import ConfigError, DataConfig, RegularizationConfig, load_config
from hidream_ft.data.collate import TrainCollator
from hidream_ft.data.demo import write_demo_dataset
from hidream_ft.data.planner import EpochPlanner, Mixing, PackedSamples, mixed_count
from hidream_ft.model.conditioning import ConditionProcessor
from hidream_ft.trainer import compute_loss


def mixed_config(tmp_path, ratio=0.25, weight=0.5, **data) -> DataConfig:
    train = write_demo_dataset(tmp_path / "train", n=6)
    regular = write_demo_dataset(tmp_path / "regular", n=4)
    return DataConfig(folders=[str(train)], buckets=[[64, 64]], num_workers=0,
                      regularization=RegularizationConfig(folders=[str(regular)], ratio=ratio, weight=weight), **data)


def test_mixed_entries_visit_every_item_equally_across_epochs():
    mixing = Mixing(np.arange(10, 14), per_epoch=3)
    draws = np.concatenate([mixing.draw(seed=5, epoch=e) for e in range(8)])  # 24 entries: 6 passes over 4 items
    assert sorted(Counter(draws.tolist()).values()) == [6, 6, 6, 6]
    assert np.array_equal(mixing.draw(5, 2), mixing.draw(5, 2)) and mixed_count(6, 0.25) == 2


def test_planner_without_mixing_keeps_its_order():
    plain = EpochPlanner(np.ones(5, dtype=int), seed=3)
    plain.set_stage(np.zeros(5, dtype=int), batch_size=1)
    mixed = EpochPlanner(np.array([1, 1, 1, 1, 1, 0]), seed=3, mixing=Mixing(np.array([5]), 0))
    mixed.set_stage(np.zeros(6, dtype=int), batch_size=1)
    assert [plain.next_batch().items for _ in range(12)] == [mixed.next_batch().items for _ in range(12)]


@pytest.mark.parametrize("packed", [False, True])
def test_regularization_share_and_weight_over_epochs_and_exact_resume(tmp_path, packed):
    cfg = mixed_config(tmp_path, **({"max_tokens": 2 * 600} if packed else {}))
    # 6 training images and a 0.25 share: 2 regularization samples per epoch of 8; 4 epochs at 2 per step.
    steps, states = drain_pipeline(cfg, 16, batch_size=2)[:2]
    samples = [s for _, [batch] in steps for s in batch]
    epochs = [samples[i:i + 8] for i in range(0, 32, 8)] if not packed else [samples]
    for epoch in epochs:
        assert sum(s.key.startswith("regularization/") for s in epoch) == len(epoch) // 4
        assert all(s.weight == (0.5 if s.key.startswith("regularization/") else 1.0) for s in epoch)
    keys = Counter(s.key for s in samples if s.key.startswith("regularization/"))
    assert len(keys) == 4 and len(set(keys.values())) == 1  # each regularization image equally often
    resumed = drain_pipeline(cfg, 6, start_step=10, state=states[9], batch_size=2)[0]
    assert [[s.key for s in b] for _, [b] in resumed] == [[s.key for s in b] for _, [b] in steps[10:]]
    assert all(torch.equal(a.pixels, b.pixels) and a.noise_seed == b.noise_seed
               for (_, [x]), (_, [y]) in zip(resumed, steps[10:]) for a, b in zip(x, y))


@pytest.mark.parametrize("text, message", [
    ("ratio = 0.3", r"data\.regularization: folders and a ratio > 0 go together"),
    ("folders = ['x']\nratio = 1.0", r"data\.regularization\.ratio: must be in \[0, 1\), got 1\.0"),
    ("folders = ['x']\nratio = 0.2\nweight = -1", r"data\.regularization\.weight: must be ≥ 0, got -1"),
])
def test_regularization_settings_are_checked(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(f"[data.regularization]\n{text}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


@pytest.fixture(scope="module")
def collator(tiny_checkpoint, tokenizer, tokens):
    return TrainCollator(tokenizer, tokens, 128, ConditionProcessor.from_pretrained(tiny_checkpoint))


@pytest.mark.parametrize("packed", [False, True])
def test_regularization_samples_weigh_their_loss(tmp_path, packed, tiny_model, collator):
    tiny_model.attention = "dense"
    cfg = mixed_config(tmp_path, ratio=0.5, weight=0.25)
    samples = [s for _, [batch] in drain_pipeline(cfg, 6, batch_size=2)[0] for s in batch]
    regular = next(s for s in samples if s.key.startswith("regularization/"))
    trained = next(s for s in samples if not s.key.startswith("regularization/"))
    pair = [trained, regular]
    diffusion = load_config(None, []).diffusion
    with torch.no_grad():
        alone = torch.stack([compute_loss(tiny_model, collator([s]), diffusion) for s in pair])
        mixed = compute_loss(tiny_model, collator(PackedSamples(pair, 1024) if packed else pair), diffusion)
    torch.testing.assert_close(mixed, (alone[0] + 0.25 * alone[1]) / 1.25, rtol=0, atol=1e-6)
