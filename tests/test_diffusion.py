"""The training objective as pure functions."""

import math

import pytest
import torch

from hidream_ft.flow.objective import add_noise, diffusion_loss, model_timestep, sample_sigmas, shift_sigmas
from hidream_ft.model.patches import patchify, pixels_from_uint8, uint8_from_pixels, unpatchify
from hidream_ft.model.heads import timestep_embedding


def test_patchify_is_row_major_and_channel_major():
    image = torch.arange(3 * 64 * 96, dtype=torch.float32).reshape(1, 3, 64, 96)
    tokens = patchify(image)
    assert tokens.shape == (1, 2 * 3, 3072)
    # token 4 = patch row 1, column 1; value index = c·1024 + i·32 + j
    c, i, j = 2, 5, 7
    assert tokens[0, 4, c * 1024 + i * 32 + j] == image[0, c, 32 + i, 32 + j]
    assert torch.equal(unpatchify(tokens, 64, 96), image)


def test_patchify_rejects_sizes_off_the_grid():
    with pytest.raises(ValueError, match="70x64 is not a multiple"):
        patchify(torch.zeros(1, 3, 64, 70))


def test_pixels_from_uint8_is_the_official_normalisation_bit_for_bit():
    codes = torch.arange(256, dtype=torch.uint8)
    expected = (codes.to(torch.float32) / 255 - 0.5) / 0.5
    pixels = pixels_from_uint8(codes)
    assert pixels.dtype == torch.float32
    assert torch.equal(pixels, expected)
    assert pixels[0] == -1.0 and pixels[255] == 1.0


def test_uint8_from_pixels_round_trips_every_code_and_clips():
    codes = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(uint8_from_pixels(pixels_from_uint8(codes)), codes)
    assert uint8_from_pixels(torch.tensor([-3.0, 2.5])).tolist() == [0, 255]
    assert uint8_from_pixels(pixels_from_uint8(codes).bfloat16()).dtype == torch.uint8


def test_uniform_sigmas_fill_the_range():
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(20000, method="uniform", sigma_min=0.1, sigma_max=0.9, generator=g)
    assert s.min() >= 0.1 and s.max() <= 0.9
    assert abs(s.mean().item() - 0.5) < 0.01


def test_logit_normal_sigmas_concentrate_around_the_mean():
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(20000, method="logit_normal", logit_mean=1.0, logit_std=0.5, sigma_min=0.0, generator=g)
    median = s.median().item()
    assert abs(median - 1 / (1 + math.exp(-1.0))) < 0.01


def test_shift_moves_sigmas_towards_noise():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_sigmas(s, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert torch.equal(shift_sigmas(s, 1.0), s)


def test_unknown_sampling_method_is_rejected():
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        sample_sigmas(2, method="cosine")


def test_noising_formula():
    x0, eps = torch.ones(2, 3, 4), torch.full((2, 3, 4), 2.0)
    sigmas = torch.tensor([0.0, 0.25])
    z = add_noise(x0, eps, sigmas, noise_scale=8.0)
    assert torch.allclose(z[0], x0[0])
    assert torch.allclose(z[1], torch.full((3, 4), 0.75 * 1 + 0.25 * 8 * 2))
    assert torch.allclose(model_timestep(sigmas), torch.tensor([1.0, 0.75]))


def test_x0_loss_is_mse_over_target_tokens():
    pred, x0 = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    pred[1] = 3.0  # error 4 per value
    sigmas = torch.tensor([0.5, 0.5])
    assert diffusion_loss(pred, x0, sigmas).item() == pytest.approx((1 + 4) / 2)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    pred[0, 1:] = 100.0  # masked-out tokens do not count
    assert diffusion_loss(pred, x0, sigmas, token_mask=mask).item() == pytest.approx((1 + 4) / 2)
    weights = torch.tensor([3.0, 1.0])
    assert diffusion_loss(pred, x0, sigmas, token_mask=mask, sample_weights=weights).item() == pytest.approx(
        (3 * 1 + 4) / 2
    )
    alone = diffusion_loss(pred[:1], x0[:1], sigmas[:1], token_mask=mask[:1], sample_weights=weights[:1])
    assert alone.item() == pytest.approx(3 * 1)  # a weight counts even in a micro-batch of one


def test_velocity_loss_weights_by_inverse_sigma_squared_with_a_floor():
    pred, x0 = torch.zeros(2, 1, 1), torch.ones(2, 1, 1)
    sigmas = torch.tensor([0.5, 0.01])
    loss = diffusion_loss(pred, x0, sigmas, kind="velocity", sigma_floor=0.1)
    assert loss.item() == pytest.approx((1 / 0.25 + 1 / 0.01) / 2)


def test_timestep_embedding_puts_cosines_first():
    emb = timestep_embedding(torch.tensor([0.0, 0.5]), dim=8)
    assert torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert emb[1, 0].item() == pytest.approx(math.cos(500.0), abs=1e-4)
    assert emb[1, 4].item() == pytest.approx(math.sin(500.0), abs=1e-4)
