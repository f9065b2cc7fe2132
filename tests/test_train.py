"""The trainer in one process: LoRA and full fine-tunes learn, the numerics guard, adapter export."""

import pytest
import torch
from peft import PeftModel

from helpers import CAPTIONS, make_trainer, noise_samples
from hidream_ft.config import ConfigError
from hidream_ft.data.collate import TextToImageCollator
from hidream_ft.model import load_model
from hidream_ft.runtime.checkpoint import MARKER, resolve_resume, step_dir_name
from hidream_ft.trainer import TrainingAborted


def fixed_batch(trainer):
    return TextToImageCollator(trainer.tokenizer, trainer.tokens, 128)(noise_samples(CAPTIONS[:2]))


@pytest.mark.parametrize("options", [
    ["train.mode='lora'", "lora.train_heads=['x_embedder', 'final_layer2']", "optim.lr=1e-2"],
    ["train.mode='full'", "optim.lr=3e-3"],
])
def test_loss_decreases_on_a_fixed_batch(tiny_checkpoint, tmp_path, options):
    trainer = make_trainer(tiny_checkpoint, tmp_path, *options)
    batch = fixed_batch(trainer)
    losses = [trainer.step([batch])["loss"] for _ in range(12)]
    assert losses[-1] < 0.8 * losses[0], losses
    assert trainer.skipped_total == 0


def test_lora_trains_only_adapters_and_keeps_them_fp32(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path, "model.dtype='bfloat16'")
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 7 * 3  # A and B for 7 linears in 3 layers
    assert all(p.dtype == torch.float32 for p in trainer.params)
    frozen = trainer.base.model.language_model.layers[0].self_attn.q_proj.base_layer.weight
    assert frozen.dtype == torch.bfloat16 and not frozen.requires_grad


def test_full_mode_freezes_vit_lm_head_and_embeddings(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path, "train.mode='full'")
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert "model.x_embedder.proj1.weight" in trainable and "model.language_model.layers.0.mlp.up_proj.weight" in trainable
    assert not any(n.startswith(("model.visual.", "lm_head", "model.language_model.embed_tokens")) for n in trainable)


def test_non_finite_steps_are_skipped_counted_and_abort(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path, "train.mode='full'", "train.max_consecutive_skips=2")
    good = fixed_batch(trainer)
    bad = fixed_batch(trainer)
    bad.x0[0, 0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    stats = trainer.step([bad])
    assert trainer.skipped_total == 1
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param.detach(), before[name]), name
    trainer.step([good])
    assert trainer.skipped_in_a_row == 0 and trainer.skipped_total == 1
    trainer.step([bad])
    trainer.step([bad])
    with pytest.raises(TrainingAborted, match="3 consecutive steps with a non-finite"):
        trainer.step([bad])
    assert stats["loss"] != stats["loss"]  # NaN reported


def test_resume_auto_ignores_folders_without_the_commit_marker(tmp_path):
    root = tmp_path / "checkpoints"
    (root / step_dir_name(10)).mkdir(parents=True)
    (root / step_dir_name(10) / MARKER).write_text("10\n")
    (root / step_dir_name(20)).mkdir()  # a save that was killed before its marker
    (root / f".{step_dir_name(30)}.tmp").mkdir()
    assert resolve_resume("auto", root) == root / step_dir_name(10)
    assert resolve_resume("none", root) is None
    with pytest.raises(ConfigError, match="no COMPLETE marker"):  # a user error: one line from the command
        resolve_resume(str(root / step_dir_name(20)), root)


def test_saved_adapter_loads_with_peft_and_reproduces_the_trained_model(tiny_checkpoint, tmp_path, tokenizer):
    trainer = make_trainer(tiny_checkpoint, tmp_path)
    batch = fixed_batch(trainer)
    for _ in range(3):
        trainer.step([batch])
    adapter = trainer.save_adapter()
    assert (adapter / "adapter_config.json").is_file()
    base = load_model(tiny_checkpoint, dtype=torch.float32, tokenizer=tokenizer)
    loaded = PeftModel.from_pretrained(base, str(adapter)).eval()
    trainer.model.eval()
    vinputs = torch.randn(2, batch.layout.num_target_tokens, 3072)
    timestep = torch.tensor([0.2, 0.7])
    with torch.no_grad():
        expected = trainer.model(**batch.layout.model_inputs(), vinputs=vinputs, timestep=timestep)
        got = loaded(**batch.layout.model_inputs(), vinputs=vinputs, timestep=timestep)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    lora_b = [v for k, v in loaded.state_dict().items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b)  # the trained (non-zero) B matrices were saved
