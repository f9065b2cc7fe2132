"""Bitwise agreement with the official pipeline's arithmetic: seeds, per-step noise, timesteps, σ, RoPE."""

import numpy as np
import pytest
import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

from hidream_ft.flow.schedules import DEFAULT_TIMESTEPS, list_schedule
from hidream_ft.inference import SamplingSettings, generate
from hidream_ft.inference.pipeline import initial_noise, prompt_inputs, to_uint8
from hidream_ft.model import load_hf_config
from hidream_ft.model.hidream import HiDreamO1
from hidream_ft.model.patches import patchify
from hidream_ft.model.reference_layout import generation_inputs

DEV_LIKE = dict(width=64, height=64, cfg=0.0, scheduler="flash", timesteps=[999, 700, 300, 8], noise_scale=7.5,
                noise_clip_std=2.5, seed=11)


@torch.no_grad()
def official_flash_sample(model, tokenizer, tokens, prompt: str, settings: SamplingSettings) -> torch.Tensor:
    """The official pipeline's flash loop (fp32, one conditional row), step by step as its source writes it."""
    height, width, seed = settings.height, settings.width, settings.seed
    z = patchify(settings.noise_scale * torch.randn((1, 3, height, width),
                                                    generator=torch.Generator("cpu").manual_seed(seed + 1)))
    global_rng = torch.Generator().manual_seed(seed + 1)  # its torch.manual_seed(seed + 1) after the start noise
    timesteps = torch.tensor(settings.timesteps, dtype=torch.long)
    sigmas = torch.tensor([t.item() / 1000.0 for t in timesteps] + [0.0])
    inputs = prompt_inputs(tokenizer, tokens, [prompt], height, width)
    for index, step_t in enumerate(timesteps):
        t_pixeldit = 1.0 - step_t.float() / 1000.0
        sigma = (step_t.float() / 1000.0).to(dtype=torch.float32).clamp_min(1e-3)
        x_pred = model(**generation_inputs(inputs, z, None), timestep=t_pixeldit.reshape(-1),
                       output_tokens=inputs.num_target_tokens)
        model_output = -((x_pred.float() - z.float()) / sigma)
        denoised = z.float() - model_output * sigmas[index]
        noise = torch.randn(model_output.shape, generator=global_rng, dtype=denoised.dtype)
        clip = settings.noise_clip_std * noise.std().item()
        noise = noise.clamp(min=-clip, max=clip)
        z = sigmas[index + 1] * noise * settings.noise_scale + (1.0 - sigmas[index + 1]) * denoised
    return to_uint8(z, height, width)


def test_flash_per_step_noise_is_a_fresh_generator_seeded_seed_plus_one(tiny_model, tokenizer, tokens):
    settings = SamplingSettings(**DEV_LIKE)
    official = official_flash_sample(tiny_model, tokenizer, tokens, "a red circle", settings)
    assert torch.equal(generate(tiny_model, tokenizer, tokens, "a red circle", settings), official)
    # The former stream, continuing the start-noise generator, gives another image.
    continued = torch.Generator().manual_seed(settings.seed + 1)
    torch.randn(1, 3, 64, 64, generator=continued)
    other = generate(tiny_model, tokenizer, tokens, "a red circle", settings, noise_generator=continued)
    assert not torch.equal(other, official)


def test_given_initial_latent_and_generator_reproduce_the_image(tiny_model, tokenizer, tokens):
    settings = SamplingSettings(**DEV_LIKE)
    image = generate(tiny_model, tokenizer, tokens, "a red circle", settings)
    elsewhere = SamplingSettings(**{**DEV_LIKE, "seed": 99})
    latent = initial_noise(settings.seed, 64, 64, settings.noise_scale)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    assert torch.equal(generate(tiny_model, tokenizer, tokens, "a red circle", elsewhere, initial_latent=latent,
                                noise_generator=generator), image)
    assert not torch.equal(generate(tiny_model, tokenizer, tokens, "a red circle", elsewhere), image)
    unipc = SamplingSettings(width=64, height=64, steps=3)
    assert torch.equal(
        generate(tiny_model, tokenizer, tokens, "a red circle", SamplingSettings(width=64, height=64, steps=3, seed=5),
                 initial_latent=initial_noise(0, 64, 64, 8.0)),
        generate(tiny_model, tokenizer, tokens, "a red circle", unipc))
    with pytest.raises(ValueError, match="patch layout"):
        generate(tiny_model, tokenizer, tokens, "a red circle", unipc, initial_latent=torch.zeros(1, 3, 64, 64))


def test_dev_sigmas_and_model_timesteps_are_the_official_float32_values():
    schedule = list_schedule(DEFAULT_TIMESTEPS)
    official = torch.tensor([t / 1000.0 for t in DEFAULT_TIMESTEPS] + [0.0])  # torch's default float32
    assert schedule.sigmas == tuple(official.tolist())
    assert schedule.sigmas[0] == float(np.float32(0.999))


def test_rope_inverse_frequencies_are_the_official_float32_ones(tiny_checkpoint):
    config = load_hf_config(tiny_checkpoint)
    with torch.device("meta"):
        model = HiDreamO1(config, tms_token_id=0)
    text = config.text_config
    head_dim = text.head_dim
    theta = float(text.rope_parameters["rope_theta"])
    official = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim))
    assert model.inv_freq.dtype == torch.float32 and model.inv_freq.device.type == "cpu"
    assert torch.equal(model.inv_freq, official)
    assert torch.equal(model.inv_freq, Qwen3VLTextRotaryEmbedding(text).original_inv_freq)
