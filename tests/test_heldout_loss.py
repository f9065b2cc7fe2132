"""Held-out loss: fixed batches, fixed σ grid, fixed noise per (sample, σ), exact reduction; training unchanged."""

import pytest
import torch
from PIL import Image

from helpers import WORKERS, run_python, tensorboard_scalars, train_tiny
from hidream_ft.config import ConfigError, DataConfig, FolderSource, ValidationConfig, load_config
from hidream_ft.data.collate import TrainCollator
from hidream_ft.data.demo import write_demo_dataset
from hidream_ft.data.heldout import HeldoutBatches
from hidream_ft.data.pack import pack
from hidream_ft.inference.heldout import heldout_loss, heldout_noise, heldout_scalars
from hidream_ft.model.conditioning import ConditionProcessor

SIGMAS = [0.2, 0.9]


@pytest.fixture(scope="module")
def collator(tiny_checkpoint, tokenizer, tokens):
    return TrainCollator(tokenizer, tokens, 48, ConditionProcessor.from_pretrained(tiny_checkpoint))


@pytest.fixture(scope="module")
def heldout_folders(tmp_path_factory):
    """Three square and two wide text-to-image images, and one edit target with its control image."""
    root = tmp_path_factory.mktemp("heldout")
    write_demo_dataset(root / "square", n=3, size=(64, 64))
    write_demo_dataset(root / "wide", n=2, size=(96, 64))
    write_demo_dataset(root / "edit", n=1, size=(64, 64))
    (root / "source").mkdir()
    Image.new("RGB", (64, 96), (30, 90, 200)).save(root / "source" / "demo_000.png")
    return root


def validation(root, batch_size: int = 2) -> ValidationConfig:
    return ValidationConfig(loss_batch_size=batch_size, loss_folders=[
        FolderSource(str(root / "square")), FolderSource(str(root / "wide")),
        FolderSource(str(root / "edit"), control_dir=str(root / "source"))])


def data_config() -> DataConfig:
    return DataConfig(buckets=[[64, 64], [96, 64]], max_text_tokens=48, num_workers=0)


def test_batches_hold_one_shape_in_folder_order_whatever_the_training_data_draws(heldout_folders, collator):
    batches = HeldoutBatches(data_config(), validation(heldout_folders), collator)
    keys = [batches[i].keys for i in range(len(batches))]
    assert keys == [["square/demo_000", "square/demo_001"], ["square/demo_002"],
                    ["wide/demo_000", "wide/demo_001"], ["edit/demo_000"]]
    assert batches.samples == 6 and batches[3].conditions is not None
    # Training data settings that draw at random leave the held-out batches alone.
    noisy = DataConfig(buckets=[[64, 64], [96, 64]], max_text_tokens=48, num_workers=0, crop="random",
                       caption_dropout=1.0, shuffle_tags=True, max_tokens=512)
    again = HeldoutBatches(noisy, validation(heldout_folders), collator)
    for i in range(len(batches)):
        assert torch.equal(again[i].target, batches[i].target)
        assert torch.equal(again[i].layout.input_ids, batches[i].layout.input_ids)


def test_per_sigma_values_equal_a_hand_computation(heldout_folders, collator, tiny_model):
    batches = HeldoutBatches(data_config(), validation(heldout_folders), collator)
    result = heldout_loss(tiny_model, batches, SIGMAS, seed=3, noise_scale=8.0)
    expected = {}
    with torch.no_grad():
        for sigma in SIGMAS:
            losses = []
            for i in range(len(batches)):
                batch = batches[i]
                x0 = batch.x0
                noise = torch.stack([heldout_noise(3, key, sigma, tuple(x0.shape[1:])) for key in batch.keys])
                z = (1 - sigma) * x0 + sigma * 8.0 * noise
                t = torch.full((batch.size,), 1 - sigma)
                x_pred = tiny_model(**batch.model_inputs(z), timestep=t, output_tokens=batch.layout.num_target_tokens)
                losses += ((x_pred - x0) ** 2).mean(dim=(1, 2)).tolist()
            expected[sigma] = sum(losses) / len(losses)
    assert result.samples == 6
    assert result.per_sigma == pytest.approx(expected, rel=1e-5)
    assert result.total == pytest.approx(sum(expected.values()) / 2, rel=1e-5)
    assert heldout_scalars(result) == {"val/loss": result.total, "val/loss_sigma_0.20": result.per_sigma[0.2],
                                       "val/loss_sigma_0.90": result.per_sigma[0.9]}
    # The noise is a function of (seed, sample, σ) alone: a second evaluation gives the same number.
    assert heldout_loss(tiny_model, batches, SIGMAS, seed=3, noise_scale=8.0) == result
    shape = (4, 3072)
    assert torch.equal(heldout_noise(3, "a", 0.2, shape), heldout_noise(3, "a", 0.2, shape))
    assert not torch.equal(heldout_noise(3, "a", 0.2, shape), heldout_noise(3, "a", 0.9, shape))
    assert not torch.equal(heldout_noise(3, "a", 0.2, shape), heldout_noise(3, "b", 0.2, shape))


def test_a_loss_mask_weighs_the_held_out_tokens(heldout_folders, collator, tiny_model, tmp_path):
    """Masks white on the left half of each 64×64 image: only the two left patches of the 2×2 grid count."""
    (tmp_path / "masks").mkdir()
    for index in range(3):
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (0, 0, 32, 64))
        mask.save(tmp_path / "masks" / f"demo_{index:03d}.png")
    masked = ValidationConfig(loss_folders=[FolderSource(str(heldout_folders / "square"),
                                                         mask_dir=str(tmp_path / "masks"))], loss_batch_size=3)
    batches = HeldoutBatches(data_config(), masked, collator)
    result = heldout_loss(tiny_model, batches, [0.5])
    batch = batches[0]
    noise = torch.stack([heldout_noise(0, key, 0.5, (4, 3072)) for key in batch.keys])
    with torch.no_grad():
        x_pred = tiny_model(**batch.model_inputs(0.5 * batch.x0 + 4.0 * noise), timestep=torch.full((3,), 0.5),
                            output_tokens=4)
    err = ((x_pred - batch.x0) ** 2).mean(dim=-1)
    assert result.total == pytest.approx(err[:, [0, 2]].mean().item(), rel=1e-5)
    assert result.total != pytest.approx(err.mean().item(), rel=1e-3)


def test_shards_packed_from_the_folder_give_the_same_batches_and_loss(heldout_folders, collator, tiny_model,
                                                                     tmp_path):
    pack(heldout_folders / "square", tmp_path / "shards", shard_size=2, shuffle_seed=None)
    from_folder = HeldoutBatches(data_config(), ValidationConfig(loss_folders=[str(heldout_folders / "square")],
                                                                 loss_batch_size=2), collator)
    from_shards = HeldoutBatches(data_config(), ValidationConfig(
        loss_shards=[str(tmp_path / "shards" / "shard-{000000..000001}.tar")], loss_batch_size=2), collator)
    assert [from_shards[i].keys for i in range(len(from_shards))] == [["demo_000", "demo_001"], ["demo_002"]]
    for i in range(len(from_folder)):
        assert from_shards[i].keys == from_folder[i].keys
        assert torch.equal(from_shards[i].target, from_folder[i].target)
        assert torch.equal(from_shards[i].layout.input_ids, from_folder[i].layout.input_ids)
    assert heldout_loss(tiny_model, from_shards, SIGMAS) == heldout_loss(tiny_model, from_folder, SIGMAS)


def test_eval_mode_is_restored_and_no_global_random_number_is_drawn(heldout_folders, collator, tiny_model):
    batches = HeldoutBatches(data_config(), validation(heldout_folders), collator)
    tiny_model.train()
    state = torch.get_rng_state()
    heldout_loss(tiny_model, batches, SIGMAS)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(module.training for module in tiny_model.modules())


def test_three_fsdp_ranks_give_the_one_process_value(tiny_checkpoint, heldout_folders, tmp_path):
    """4 batches over 3 ranks: rank 0 evaluates two, the others one and then a discarded repeat of batch 0."""
    single, sharded = tmp_path / "single.pt", tmp_path / "sharded.pt"
    run_python(WORKERS / "heldout_loss.py", tiny_checkpoint, heldout_folders, single)
    run_python(WORKERS / "heldout_loss.py", tiny_checkpoint, heldout_folders, sharded, nproc=3)
    alone = torch.load(f"{single}.rank0", weights_only=False)
    ranks = [torch.load(f"{sharded}.rank{r}", weights_only=False) for r in range(3)]
    assert alone.samples == 6
    # fp32 weights, the same batches, the same per-sample forwards and the same summation order: identical.
    assert all(result == alone for result in ranks)


@pytest.fixture(scope="module")
def training_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_demo_dataset(root / "square", n=4, size=(64, 64))
    write_demo_dataset(root / "wide", n=2, size=(96, 64))
    return root


def train(tiny_checkpoint, training_folders, heldout_folders, output, steps, *overrides):
    """A packed LoRA run (data.max_tokens) of ``steps`` steps, a checkpoint every 2."""
    return train_tiny(tiny_checkpoint, output, steps, "data.buckets=[[64, 64], [96, 64]]", "data.max_tokens=256",
                      f"data.folders=['{training_folders / 'square'}', '{training_folders / 'wide'}']", *overrides)


def test_training_is_unchanged_by_the_held_out_loss_and_resumes_exactly(tiny_checkpoint, training_folders,
                                                                       heldout_folders, tmp_path):
    heldout = ["validation.loss_every=2", "validation.loss_sigmas=[0.3, 0.7]", "validation.loss_batch_size=2",
               f"validation.loss_folders=['{heldout_folders / 'square'}', '{heldout_folders / 'wide'}']"]
    off = train(tiny_checkpoint, training_folders, heldout_folders, tmp_path / "off", 4)
    on = train(tiny_checkpoint, training_folders, heldout_folders, tmp_path / "on", 4, *heldout)
    assert on["history"] == off["history"] and sorted(on["history"]) == [1, 2, 3, 4]
    values = tensorboard_scalars(tmp_path / "on", "val/loss")
    assert sorted(values) == [2, 4] and values[2] != values[4]
    assert sorted(tensorboard_scalars(tmp_path / "on", "val/loss_sigma_0.30")) == [2, 4]
    assert not tensorboard_scalars(tmp_path / "off", "val/loss")

    train(tiny_checkpoint, training_folders, heldout_folders, tmp_path / "resumed", 2, *heldout)
    resumed = train(tiny_checkpoint, training_folders, heldout_folders, tmp_path / "resumed", 4, *heldout)
    assert resumed["history"] == {step: on["history"][step] for step in (3, 4)}
    assert tensorboard_scalars(tmp_path / "resumed", "val/loss") == values


@pytest.mark.parametrize("override, message", [
    ("validation.loss_every=5", r"validation.loss_folders: a held-out loss every 5 steps needs held-out images"),
    ("validation.loss_folders=['a'];validation.loss_shards=['b.tar']", r"validation: set either loss_folders or "
     "loss_shards, not both"),
    ("validation.loss_every=-1", r"validation.loss_every: must be ≥ 0"),
    ("validation.loss_sigmas=[0.5, 0.0]",
     r"validation.loss_sigmas: expected one or more σ in \(0, 1\], got \[0.5, 0.0\]"),
    ("validation.loss_sigmas=[1.5]", r"validation.loss_sigmas: expected one or more σ in \(0, 1\]"),
    ("validation.loss_sigmas=[]", r"validation.loss_sigmas: expected one or more σ"),
    ("validation.loss_sigmas=[0.5, 0.5]", r"validation.loss_sigmas: a σ is listed twice"),
    ("validation.loss_batch_size=0", r"validation.loss_batch_size: must be at least 1, got 0"),
    ("validation.loss_folders=[{num_repeats=1}]", r"validation.loss_folders\[0\].path: a folder path is required"),
])
def test_bad_settings_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(None, override.split(";"))
    assert "\n" not in str(error.value)


def test_held_out_paths_in_a_file_are_relative_to_it(tmp_path):
    (tmp_path / "configs").mkdir()
    folders, shards = tmp_path / "configs" / "folders.toml", tmp_path / "configs" / "shards.toml"
    folders.write_text('[validation]\nloss_folders = ["../held", { path = "./more", mask_dir = "../masks" }]\n')
    shards.write_text('[validation]\nloss_shards = ["../shards/a-{0..1}.tar"]\n')
    held_out = load_config(folders).validation
    assert [f.path for f in held_out.loss_folders] == [str(tmp_path / "held"), str(tmp_path / "configs" / "more")]
    assert held_out.loss_folders[1].mask_dir == str(tmp_path / "masks")
    assert load_config(shards).validation.loss_shards == [str(tmp_path / "shards" / "a-{0..1}.tar")]
