"""The sampling loop on the tiny model: determinism, CFG batching, the documented math end to end, LoRAs."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hidream_ft.convert import load_adapter
from hidream_ft.model.patches import patchify
from hidream_ft.inference import SamplingSettings, generate, lora_applied, parse_lora_spec
from hidream_ft.inference.pipeline import initial_noise, predict_x0, prompt_inputs, to_uint8
from hidream_ft.model import load_model
from hidream_ft.model.layout import EMPTY_PROMPT

SMALL = dict(width=64, height=96, steps=3)


def tiny_settings(**overrides) -> SamplingSettings:
    return SamplingSettings(**{**SMALL, **overrides})


@pytest.mark.parametrize("scheduler", ["unipc", "flow_match", "flash"])
def test_fixed_seed_gives_identical_images(tiny_model, tokenizer, tokens, scheduler):
    settings = tiny_settings(scheduler=scheduler, noise_clip_std=2.5 if scheduler == "flash" else 0.0)
    rng_before = torch.get_rng_state()
    first = generate(tiny_model, tokenizer, tokens, "a red circle", settings)
    again = generate(tiny_model, tokenizer, tokens, "a red circle", settings)
    other_seed = generate(tiny_model, tokenizer, tokens, "a red circle", tiny_settings(scheduler=scheduler, seed=1))
    assert first.dtype == torch.uint8 and first.shape == (3, 96, 64)
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG stream is not consumed


def test_bf16_autocast_path_is_deterministic_and_close(tiny_model, tokenizer, tokens):
    """The CUDA default (bf16 autocast, bf16 state between steps), exercised on the CPU."""
    settings = tiny_settings(steps=4)
    reduced = generate(tiny_model, tokenizer, tokens, "a red circle", settings, autocast=True)
    assert torch.equal(reduced, generate(tiny_model, tokenizer, tokens, "a red circle", settings, autocast=True))
    full = generate(tiny_model, tokenizer, tokens, "a red circle", settings)
    assert (reduced.float() - full.float()).abs().mean() < 2.0


def test_initial_noise_is_seed_plus_one():
    z = initial_noise(4, 64, 32, 8.0)
    expected = 8.0 * torch.randn(1, 3, 64, 32, generator=torch.Generator().manual_seed(5))
    assert torch.equal(z, patchify(expected))


def test_cfg_batch_equals_separate_forwards(tiny_model, tokenizer, tokens):
    prompts = ["a yellow triangle over a gradient with a longer prompt", EMPTY_PROMPT]
    batched = prompt_inputs(tokenizer, tokens, prompts, 64, 64)
    assert batched.attention_mask is not None  # the prompts differ in length: the batch is left-padded
    z = initial_noise(0, 64, 64, 8.0)
    with torch.no_grad():
        together = predict_x0(tiny_model, batched, z, 700.0)
        apart = [predict_x0(tiny_model, prompt_inputs(tokenizer, tokens, [p], 64, 64), z, 700.0) for p in prompts]
    assert torch.allclose(together[0], apart[0][0], atol=1e-5)
    assert torch.allclose(together[1], apart[1][0], atol=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-3)


def test_one_euler_step_from_pure_noise_returns_the_model_x0(tiny_model, tokenizer, tokens):
    """σ: 1 → 0 in one Euler step gives z = x̂0(noise, t = 0): checks seeding, timestep and output conventions."""
    settings = tiny_settings(scheduler="flow_match", steps=1, cfg=1.0, seed=3)
    image = generate(tiny_model, tokenizer, tokens, "a green square", settings)
    z = initial_noise(3, 96, 64, 8.0)
    with torch.no_grad():
        x_pred = predict_x0(tiny_model, prompt_inputs(tokenizer, tokens, ["a green square"], 96, 64), z, 1000.0)
    assert torch.equal(image, to_uint8(x_pred, 96, 64))


def _rows_per_forward(model, run) -> list[int]:
    rows = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]),
                                             with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return rows


def test_guidance_adds_the_unconditional_row_only_above_one(tiny_model, tokenizer, tokens):
    def run(cfg):
        return lambda: generate(tiny_model, tokenizer, tokens, "a red circle", tiny_settings(cfg=cfg))

    assert _rows_per_forward(tiny_model, run(5.0)) == [2, 2, 2]
    assert _rows_per_forward(tiny_model, run(1.0)) == [1, 1, 1]
    guided = generate(tiny_model, tokenizer, tokens, "a red circle", tiny_settings(cfg=5.0))
    plain = generate(tiny_model, tokenizer, tokens, "a red circle", tiny_settings(cfg=1.0))
    assert not torch.equal(guided, plain)


@pytest.fixture()
def peft_adapter_dir(tiny_checkpoint, tokenizer, tmp_path):
    """A trained-looking PEFT adapter (non-zero B) on q/v projections, saved like the trainer's adapter/."""
    base = load_model(tiny_checkpoint, dtype=torch.float32, tokenizer=tokenizer)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*self_attn\.(q_proj|v_proj)")
    peft_model = get_peft_model(base, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", peft_model.eval()


def test_lora_hooks_match_peft_and_are_removed(tiny_model, tokenizer, tokens, peft_adapter_dir):
    adapter_dir, peft_model = peft_adapter_dir
    adapter = load_adapter(adapter_dir)
    inputs = prompt_inputs(tokenizer, tokens, ["a red circle", EMPTY_PROMPT], 64, 64)
    z = initial_noise(0, 64, 64, 8.0)
    with torch.no_grad():
        base = predict_x0(tiny_model, inputs, z, 500.0)
        reference = predict_x0(peft_model, inputs, z, 500.0)
        with lora_applied(tiny_model, [(adapter, 1.0)]):
            hooked = predict_x0(tiny_model, inputs, z, 500.0)
        after = predict_x0(tiny_model, inputs, z, 500.0)
        with lora_applied(tiny_model, [(adapter, 0.5), (adapter, 0.5)]):  # weights add up like stacking
            halves = predict_x0(tiny_model, inputs, z, 500.0)
    assert not torch.allclose(base, reference, atol=1e-3)
    assert torch.allclose(hooked, reference, atol=1e-5)
    assert torch.allclose(halves, reference, atol=1e-5)
    assert torch.equal(after, base)


def test_lora_changes_the_image(tiny_model, tokenizer, tokens, peft_adapter_dir):
    adapter = load_adapter(peft_adapter_dir[0])
    settings = tiny_settings()
    base = generate(tiny_model, tokenizer, tokens, "a red circle", settings)
    with lora_applied(tiny_model, [(adapter, 1.0)]):
        styled = generate(tiny_model, tokenizer, tokens, "a red circle", settings)
    assert not torch.equal(base, styled)


def test_lora_spec_parsing():
    assert parse_lora_spec("runs/a/adapter") == ("runs/a/adapter", 1.0)
    assert parse_lora_spec("style.safetensors:0.75") == ("style.safetensors", 0.75)
    assert parse_lora_spec("C:/loras/x.safetensors") == ("C:/loras/x.safetensors", 1.0)
    with pytest.raises(ValueError, match="empty LoRA spec"):
        parse_lora_spec("")
