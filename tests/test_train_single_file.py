"""Training on the weights of a ComfyUI single-file checkpoint (model.weights)."""

from helpers import CAPTIONS, make_trainer, noise_samples

from hidream_ft.convert import merge_checkpoint
from hidream_ft.data.collate import TextToImageCollator


def test_training_runs_on_a_comfyui_single_file(tiny_checkpoint, tmp_path):
    comfy = merge_checkpoint(tiny_checkpoint, tmp_path / "comfy.safetensors", layout="comfyui")
    trainer = make_trainer(tiny_checkpoint, tmp_path / "run", f"model.weights='{comfy}'", "optim.lr=1e-2")
    assert trainer.base.lm_head is None  # the file lacks it, and training does not build it
    batch = TextToImageCollator(trainer.tokenizer, trainer.tokens, 128)(noise_samples(CAPTIONS[:2]))
    losses = [trainer.step([batch])["loss"] for _ in range(6)]
    assert losses[-1] < losses[0], losses
