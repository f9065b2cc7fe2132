"""Every quality option at once, as configs/lora_full_objective.toml combines them: the x0 loss with the LPIPS and
DINO terms, LoRA prior preservation, an EMA of the adapter and the held-out loss, on packed batches of two sizes,
trained by the real entry point on two FSDP ranks; stopped halfway and resumed, the run ends bit for bit where
an uninterrupted one does."""

from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import run_python, tensorboard_scalars, tiny_overrides
from hidream_ft.config import load_config, to_toml
from hidream_ft.data.demo import write_demo_dataset

pytestmark = pytest.mark.distributed

STEPS = 4
SCALARS = ("train/loss", "train/dino_loss", "train/lpips_loss", "val/loss", "val/loss_sigma_0.30")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("full-objective")
    for name, n in (("train", 4), ("heldout", 1)):
        write_demo_dataset(root / name / "square", n=n, size=(64, 64))
        write_demo_dataset(root / name / "wide", n=n, size=(96, 64))
    return root


def train(checkpoint: Path, folders: Path, dino: Path, lpips: Path, out: Path, steps: int) -> None:
    overrides = [
        *tiny_overrides(checkpoint, out), f"train.max_steps={steps}", "optim.lr=1e-3", "optim.schedule='constant'",
        "logging.log_every=1", "checkpoint.every=0", "model.attention='dense'", "data.num_workers=0",
        f"data.folders=['{folders / 'train' / 'square'}', '{folders / 'train' / 'wide'}']",
        "data.buckets=[[64, 64], [96, 64]]", "data.max_text_tokens=48", "data.max_tokens=256",
        f"perceptual.dino_path='{dino}'", "perceptual.dino_weight=0.5", f"perceptual.lpips_path='{lpips}'",
        "perceptual.lpips_weight=0.5", "perceptual.resolution=64", "perceptual.sigma_max=0.9",
        "preservation.prompts=['a photo of a cat', 'a street at night']",
        "ema.enabled=true", "ema.decay=0.9",
        "validation.loss_every=2", "validation.loss_sigmas=[0.3, 0.7]",
        f"validation.loss_folders=['{folders / 'heldout' / 'square'}', '{folders / 'heldout' / 'wide'}']",
    ]
    config = out.parent / f"{out.name}-{steps}.toml"
    config.write_text(to_toml(load_config(None, overrides)))  # a bad key fails here, not inside torchrun
    run_python("-m", "hidream_ft.train", "--config", config, nproc=2, timeout=600)


def adapter_tensors(out: Path, folder: str) -> dict:
    return {key: value.numpy().tobytes() for key, value in
            load_file(out / folder / "adapter_model.safetensors").items()}


def test_two_fsdp_ranks_train_every_option_together_and_resume_bitwise(tiny_checkpoint, folders, dino_path,
                                                                      lpips_path, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_checkpoint, folders, dino_path, lpips_path, straight, STEPS)
    train(tiny_checkpoint, folders, dino_path, lpips_path, resumed, STEPS // 2)
    train(tiny_checkpoint, folders, dino_path, lpips_path, resumed, STEPS)

    expected_steps = {"val/loss": [2, 4], "val/loss_sigma_0.30": [2, 4]}
    for tag in SCALARS:
        values = tensorboard_scalars(straight, tag)
        assert sorted(values) == expected_steps.get(tag, list(range(1, STEPS + 1))), tag
        assert all(value > 0 for value in values.values()), (tag, values)
        assert tensorboard_scalars(resumed, tag) == values, tag
    assert tensorboard_scalars(straight, "val/loss")[2] != tensorboard_scalars(straight, "val/loss")[4]
    kept = tensorboard_scalars(straight, "train/preservation_loss")
    assert kept[1] == 0 < kept[STEPS] and tensorboard_scalars(resumed, "train/preservation_loss") == kept

    for folder in ("adapter", "adapter-ema"):
        assert adapter_tensors(resumed, folder) == adapter_tensors(straight, folder), folder
    assert adapter_tensors(straight, "adapter") != adapter_tensors(straight, "adapter-ema")
