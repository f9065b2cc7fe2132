"""Training on edit / IP batches in one process: the collator, the target-only loss, LoRA on the ViT."""

import pytest
import torch

from helpers import edit_samples, make_trainer, quantized_pixels, t2i_samples, tiny_overrides
from hidream_ft.config import load_config
from hidream_ft.data.collate import TextToImageCollator, TrainCollator
from hidream_ft.flow.objective import diffusion_loss, draw_sigmas_and_noise
from hidream_ft.model.conditioning import ConditionProcessor
from hidream_ft.trainer import compute_loss


@pytest.fixture(scope="module")
def collator(tiny_checkpoint, tokenizer, tokens):
    return TrainCollator(tokenizer, tokens, 128, ConditionProcessor.from_pretrained(tiny_checkpoint))


def test_text_to_image_batches_are_unchanged(collator, tokenizer, tokens):
    plain = TextToImageCollator(tokenizer, tokens, 128)(t2i_samples())
    batch = collator(t2i_samples())
    assert batch.conditions is None
    for name in ("input_ids", "position_ids", "token_types", "attention_mask"):
        assert torch.equal(getattr(batch.layout, name), getattr(plain.layout, name)), name
    assert torch.equal(batch.x0, plain.x0) and batch.noise_seeds == plain.noise_seeds
    z = torch.zeros_like(batch.x0)
    assert set(batch.model_inputs(z)) == {"input_ids", "position_ids", "token_types", "attention_mask", "vinputs"}


def test_edit_batch_carries_references_after_the_target(collator, tokens):
    samples = edit_samples()
    batch = collator(samples)
    assert batch.x0.shape == (2, 4, 3072)  # the target only: 64x64
    assert batch.conditions.references.shape == (2, 6, 3072)  # one 64x96 reference each
    assert batch.conditions.image_grid_thw.tolist() == [[1, 18, 28]] * 2
    z = torch.randn_like(batch.x0)
    inputs = batch.model_inputs(z)
    assert torch.equal(inputs["vinputs"][:, :4], z) and torch.equal(inputs["vinputs"][:, 4:], batch.conditions.references)
    assert inputs["token_types"].shape[1] == inputs["input_ids"].shape[1] + 10
    assert (inputs["input_ids"] == tokens.image_pad).sum(1).tolist() == [126, 126]


def test_batches_must_not_mix_tasks_or_reference_shapes(collator):
    with pytest.raises(ValueError, match="mixes samples with and without references"):
        collator([*edit_samples()[:1], *t2i_samples()[:1]])
    one, two = edit_samples()
    two.references = [quantized_pixels(64, 64, 3)]
    with pytest.raises(ValueError, match="must share target and reference sizes"):
        collator([one, two])
    one.references = [quantized_pixels(32, 32, 4)] * 11
    with pytest.raises(ValueError, match="sample e0: 11 reference images given; edit/IP layouts take 1 to 10"):
        collator([one])


def test_loss_is_computed_on_the_target_tokens_only(collator, tiny_model):
    cfg = load_config(None, [])
    batch = collator(edit_samples(num_references=2))
    predicted_rows = []

    def model(**kwargs):
        out = tiny_model(**kwargs)
        predicted_rows.append(out.shape[1])
        return out

    loss = compute_loss(model, batch, cfg.diffusion)
    assert predicted_rows == [batch.layout.num_target_tokens] == [4]
    # The same draw by hand: predict every image token (target + 12 reference tokens), keep the target rows.
    d = cfg.diffusion
    sigmas, noise = draw_sigmas_and_noise(batch.noise_seeds, batch.x0.shape[1:], "cpu", method=d.timestep_sampling,
                                          logit_mean=d.logit_mean, logit_std=d.logit_std, shift=d.shift,
                                          sigma_min=d.sigma_min, sigma_max=d.sigma_max)
    z = (1 - sigmas[:, None, None]) * batch.x0 + sigmas[:, None, None] * d.noise_scale * noise
    full = tiny_model(**batch.model_inputs(z), timestep=1 - sigmas)
    assert full.shape[1] == 4 + 12
    torch.testing.assert_close(loss, diffusion_loss(full[:, :4], batch.x0, sigmas))
    # References condition the prediction but are never supervised: other reference content, same rows.
    batch.conditions.references = batch.conditions.references.flip(-1)
    assert compute_loss(model, batch, cfg.diffusion) != loss and predicted_rows[-1] == 4


def test_lora_on_the_vit_learns_from_edit_batches_and_gets_zero_grads_on_t2i(tiny_checkpoint, tmp_path, collator):
    trainer = make_trainer(tiny_checkpoint, tmp_path, "optim.lr=1e-2", "lora.include_visual=true",
                           "lora.train_heads=['x_embedder', 'final_layer2']")
    visual = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad and ".visual." in n}
    assert visual and all(".lora_" in n for n in visual)
    edit, t2i = collator(edit_samples()), collator(t2i_samples())

    compute_loss(trainer.model, t2i, trainer.cfg.diffusion).backward()
    for name, param in visual.items():
        assert param.grad is not None and param.grad.abs().sum() == 0, name  # present, and exactly zero
    trainer.optimizer.zero_grad(set_to_none=True)

    compute_loss(trainer.model, edit, trainer.cfg.diffusion).backward()
    assert any(p.grad.abs().sum() > 0 for n, p in visual.items() if "lora_B" in n)
    trainer.optimizer.zero_grad(set_to_none=True)

    losses = [trainer.step([edit])["loss"] for _ in range(6)]
    assert losses[-1] < 0.9 * losses[0], losses
    assert trainer.skipped_total == 0


def test_training_run_on_mixed_text_to_image_and_edit_folders(tiny_checkpoint, tmp_path):
    from PIL import Image

    from hidream_ft.data.demo import write_demo_dataset
    from hidream_ft.parallel.distributed import shutdown
    from hidream_ft.trainer import run

    write_demo_dataset(tmp_path / "t2i", n=2, size=(64, 64))
    write_demo_dataset(tmp_path / "edit", n=2, size=(64, 64))
    for index in range(2):
        (tmp_path / "source").mkdir(exist_ok=True)
        Image.new("RGB", (128, 64), (30, 90 * index, 200)).save(tmp_path / "source" / f"demo_{index:03d}.png")
    cfg = load_config(None, [
        *tiny_overrides(tiny_checkpoint, tmp_path / "run"), "logging.tensorboard=false", "train.max_steps=4",
        "lora.include_visual=true", "data.num_workers=0", "data.buckets=[[64, 64]]",
        f"data.folders=['{tmp_path / 't2i'}', {{path='{tmp_path / 'edit'}', control_dir='{tmp_path / 'source'}'}}]",
    ])
    try:
        result = run(cfg)
    finally:
        shutdown()
    assert result["step"] == 4 and len(result["history"]) == 4 and result["skipped"] == 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
