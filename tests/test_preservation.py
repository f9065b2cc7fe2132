"""Preserving the base model: regularization images mixed in at a ratio with their own loss weight, and LoRA
prior preservation against the model with its adapter disabled."""

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest
import torch

from torch._dynamo.utils import counters

from helpers import (
    CAPTIONS, WORKERS, drain_pipeline, edit_samples, make_trainer, noise_samples, run_python, set_flags, t2i_samples,
    train_tiny,
)
from hidream_ft.config import ConfigError, DataConfig, RegularizationConfig, load_config
from hidream_ft.data.collate import TrainCollator
from hidream_ft.data.demo import write_demo_dataset
from hidream_ft.data.planner import EpochPlanner, Mixing, PackedSamples, mixed_count
from hidream_ft.data.samples import Sample
from hidream_ft.model.conditioning import ConditionProcessor
from hidream_ft.parallel import fsdp
from hidream_ft.preservation import preservation_loss, preservation_prompts
from hidream_ft.trainer import check_inputs, compute_loss
from test_compile import GraphCalls, caption, fresh_dynamo  # noqa: F401 (a fixture)


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
        unweighted = compute_loss(tiny_model, collator([dataclasses.replace(regular, weight=1.0)]), diffusion)
    torch.testing.assert_close(alone[1], 0.25 * unweighted, rtol=0, atol=1e-6)  # even alone in its batch
    torch.testing.assert_close(mixed, (alone[0] + alone[1]) / 2, rtol=0, atol=1e-6)


PROMPTS = ["a photo of a dog", "a city street at night", "a bowl of fruit on a table"]


def preserving_trainer(tiny_checkpoint, tmp_path, *overrides):
    trainer = make_trainer(tiny_checkpoint, tmp_path, f"preservation.prompts={PROMPTS}", *overrides)
    collate = TrainCollator(trainer.tokenizer, trainer.tokens, 128,
                            ConditionProcessor.from_pretrained(tiny_checkpoint),
                            preservation_prompts(trainer.cfg.preservation))
    return trainer, collate


@pytest.mark.parametrize("packed", [False, True])
def test_preservation_batches_hold_the_prompts_in_the_captions_place(tiny_checkpoint, tmp_path, packed):
    trainer, collate = preserving_trainer(tiny_checkpoint, tmp_path)
    samples = noise_samples(CAPTIONS[:2])
    samples = PackedSamples(samples, 512) if packed else samples
    batch = collate(samples)
    plain = TrainCollator(trainer.tokenizer, trainer.tokens, 128,
                          ConditionProcessor.from_pretrained(tiny_checkpoint))(samples)
    assert plain.preservation_layout is None and torch.equal(plain.layout.input_ids, batch.layout.input_ids)
    text = trainer.tokenizer.batch_decode(batch.preservation_layout.input_ids)
    for sample in samples:
        assert PROMPTS[sample.noise_seed % 3] in "".join(text)
        assert sample.caption not in "".join(text)


@pytest.mark.parametrize("packed", [False, True])
def test_edit_batches_keep_their_references_under_the_preservation_prompts(tiny_checkpoint, tmp_path, packed):
    trainer, collate = preserving_trainer(tiny_checkpoint, tmp_path)
    samples = edit_samples(2) + (t2i_samples() if packed else [])
    batch = collate(PackedSamples(samples, 1024) if packed else samples)
    assert batch.conditions is not None and batch.preservation_layout is not None
    with torch.no_grad():
        assert float(preservation_loss(trainer.model, batch, trainer.cfg.diffusion)) == 0.0


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr"])
def test_preservation_is_zero_for_a_fresh_adapter_and_grows_with_training(tiny_checkpoint, tmp_path, kind):
    trainer, collate = preserving_trainer(tiny_checkpoint, tmp_path, f"lora.kind='{kind}'")
    batch = collate(noise_samples(CAPTIONS[:2]))
    diffusion = trainer.cfg.diffusion
    with torch.no_grad():
        fresh = preservation_loss(trainer.model, batch, diffusion)
    assert float(fresh) == 0.0
    off = make_trainer(tiny_checkpoint, tmp_path / "off", f"lora.kind='{kind}'")
    # A fresh adapter adds exactly nothing: the first step's loss is the plain diffusion loss.
    first = trainer.step([batch])
    assert first["loss"] == off.step([batch])["loss"] and first["terms"] == {"preservation": 0.0}
    for _ in range(3):
        logged = trainer.step([batch])["terms"]["preservation"]  # the term alone, unweighted
    assert logged > 0
    trainer.model.zero_grad(set_to_none=True)
    trained = preservation_loss(trainer.model, batch, diffusion)
    assert float(trained.detach()) > 0
    trained.backward()
    with_grad = {name for name, p in trainer.model.named_parameters() if p.grad is not None}
    adapter = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert with_grad == adapter and any(float(p.grad.abs().sum()) > 0 for p in trainer.params)


def test_preservation_needs_lora_and_readable_prompts(tmp_path):
    with pytest.raises(ConfigError, match=r"preservation: .* needs train\.mode = 'lora', got 'full'"):
        load_config(None, ["train.mode='full'", "preservation.prompts=['a dog']"])
    with pytest.raises(ConfigError, match=r"preservation\.weight: must be > 0, got 0"):
        load_config(None, ["preservation.prompts=['a dog']", "preservation.weight=0"])
    cfg = load_config(None, [f"preservation.prompts_file='{tmp_path / 'nowhere.txt'}'"])
    with pytest.raises(ConfigError, match=r"preservation\.prompts_file: .*nowhere\.txt' is not a file"):
        preservation_prompts(cfg.preservation)
    (tmp_path / "prompts.txt").write_text("a cat\n\n  a boat  \n")
    cfg = load_config(None, ["preservation.prompts=['a dog']",
                             f"preservation.prompts_file='{tmp_path / 'prompts.txt'}'"])
    assert preservation_prompts(cfg.preservation) == ["a dog", "a cat", "a boat"]


def run_worker(tiny_checkpoint, tmp_path, name, run_dir, *flags):
    out = tmp_path / f"{name}.json"
    options = set_flags("train.max_steps=4", f"preservation.prompts={PROMPTS}", "preservation.weight=2.0",
                        "parallel.activation_checkpointing='full'", "parallel.ac_every=1")
    run_python(WORKERS / "fixed_batches.py", tiny_checkpoint, run_dir, out, 4, *flags, *options, nproc=2)
    return json.loads(out.read_text())


@pytest.mark.distributed
def test_two_ranks_with_preservation_and_checkpointing_train_and_resume_bit_exactly(tiny_checkpoint, tmp_path):
    straight = run_worker(tiny_checkpoint, tmp_path, "straight", tmp_path / "straight")
    assert straight["frozen_shards"] > 0
    run_worker(tiny_checkpoint, tmp_path, "first", tmp_path / "run", "--save-at", 2)
    resumed = run_worker(tiny_checkpoint, tmp_path, "second", tmp_path / "run", "--resume")
    assert resumed["losses"] == {k: v for k, v in straight["losses"].items() if int(k) > 2}
    assert resumed["digest"] == straight["digest"]


def test_compiled_layers_keep_a_bounded_set_of_graphs_while_the_adapter_toggles(tiny_checkpoint, tmp_path, monkeypatch,
                                                                               fresh_dynamo):
    """The adapter-off forward runs under no_grad with PEFT's disable flag set: dynamo guards on both, so each
    compiled layer holds one more graph for it; after the warm-up new caption lengths compile nothing."""
    calls = GraphCalls()
    compile_layers = fsdp.apply_compile
    monkeypatch.setattr(fsdp, "apply_compile", lambda layers: compile_layers(layers[1:], backend=calls.backend))
    trainer, collate = preserving_trainer(tiny_checkpoint, tmp_path, "parallel.compile=true")

    def step(words):
        samples = [Sample(torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(words)) * 2 - 1,
                          caption(words - 3 * i, i), f"s{i}", noise_seed=i) for i in range(2)]
        trainer.step([collate(samples)])

    for words in range(5, 9):
        step(words)
    warm = dict(calls.compiled)
    for words in range(9, 21):
        step(words)
    print(f"graphs after the warm-up: {warm}")
    assert calls.compiled == warm and dict(counters["graph_break"]) == {}


def test_a_run_with_both_options_trains_and_resumes_exactly(tiny_checkpoint, tmp_path):
    data = mixed_config(tmp_path)

    def train(output, steps):
        return train_tiny(
            tiny_checkpoint, tmp_path / output, steps, "logging.tensorboard=false", "data.buckets=[[64, 64]]",
            "data.max_tokens=200", f"data.folders=['{data.folders[0].path}']",
            f"data.regularization.folders=['{data.regularization.folders[0].path}']",
            "data.regularization.ratio=0.25", "data.regularization.weight=0.5", f"preservation.prompts={PROMPTS}")

    full = train("full", 4)
    assert full["step"] == 4 and full["skipped"] == 0 and sorted(full["history"]) == [1, 2, 3, 4]
    train("resumed", 2)
    resumed = train("resumed", 4)
    assert resumed["history"] == {step: full["history"][step] for step in (3, 4)}


def test_a_missing_regularization_folder_stops_the_run_before_the_model_loads(tiny_checkpoint, tmp_path):
    cfg = load_config(None, [f"model.path='{tiny_checkpoint}'", f"data.folders=['{tmp_path}']",
                             f"data.regularization.folders=['{tmp_path / 'nowhere'}']", "data.regularization.ratio=0.2"])
    with pytest.raises(ConfigError, match=r"data\.regularization\.folders\[0\]: .*nowhere' is not a directory"):
        check_inputs(cfg)
