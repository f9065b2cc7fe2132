"""Schedules and solver steps against hand-computed values and an ODE with a known solution."""

import math

import numpy as np
import pytest
import torch

from hidream_ft.inference.pipeline import SIGMA_FLOOR, guided_velocity
from hidream_ft.flow.schedules import (
    DEFAULT_TIMESTEPS, build_schedule, flow_match_schedule, list_schedule, unipc_schedule,
)
from hidream_ft.inference.solvers import (
    clip_noise, euler_step, flash_noise_scales, flash_step, flow_lambda, make_solver, unipc_coefficients,
    unipc_update,
)


def test_unipc_schedule_matches_the_official_timesteps():
    schedule = unipc_schedule(50, 3.0)
    assert len(schedule) == 50 and len(schedule.sigmas) == 51
    assert [int(t) for t in schedule.timesteps[:5]] == [999, 993, 986, 979, 971]
    assert [int(t) for t in schedule.timesteps[-5:]] == [249, 206, 160, 111, 57]
    # σ_max = shift(shift(0.999)): the training grid is shifted once, the inference grid again.
    once = 3 * 0.999 / (1 + 2 * 0.999)
    assert schedule.sigmas[0] == pytest.approx(3 * once / (1 + 2 * once), abs=1e-6)
    assert schedule.sigmas[-1] == 0.0
    # Timesteps are truncated while σ stays float: the model and the solver see slightly different levels.
    assert all(int(1000 * s) == t for s, t in zip(schedule.sigmas, schedule.timesteps))


def test_flow_match_schedule_by_hand():
    plain = flow_match_schedule(4, 1.0)
    assert plain.timesteps == pytest.approx([1000, 667, 334, 1], abs=1e-3)
    assert plain.sigmas == pytest.approx([1.0, 0.667, 0.334, 0.001, 0.0], abs=1e-6)
    # shift 3: σ_min = 3·0.001/1.002, ramp 1 → σ_min in 3 points, shifted again.
    shifted = flow_match_schedule(3, 3.0)
    sigma_min = 3 * 0.001 / 1.002
    middle = (1 + sigma_min) / 2
    expected = [1.0, 3 * middle / (1 + 2 * middle), 3 * sigma_min / (1 + 2 * sigma_min), 0.0]
    assert shifted.sigmas == pytest.approx(expected, abs=1e-6)
    assert shifted.timesteps == pytest.approx([1000 * s for s in expected[:-1]], abs=1e-3)


def test_timestep_list_overrides_steps_and_shift():
    schedule = build_schedule("flash", steps=50, shift=3.0, timesteps=DEFAULT_TIMESTEPS)
    assert len(schedule) == 28 and schedule.timesteps == tuple(float(t) for t in DEFAULT_TIMESTEPS)
    assert schedule.sigmas[0] == float(np.float32(0.999)) and schedule.sigmas[-2] == float(np.float32(0.008))
    assert schedule.sigmas[-1] == 0.0


@pytest.mark.parametrize("timesteps, message", [
    ([], "empty"), ([500, 600], "strictly decreasing"), ([1200, 10], r"\(0, 1000\]"), ([500, 0], r"\(0, 1000\]"),
])
def test_bad_timestep_lists(timesteps, message):
    with pytest.raises(ValueError, match=message):
        list_schedule(timesteps)


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown scheduler 'ddim'"):
        build_schedule("ddim", 10, 1.0)
    with pytest.raises(ValueError, match="below 1000"):
        build_schedule("unipc", 10, 1.0, timesteps=[1000, 500])
    with pytest.raises(ValueError, match="steps must be ≥ 1"):
        build_schedule("unipc", 0, 3.0)


def test_euler_and_flash_steps_by_hand():
    z, dz = torch.tensor([1.0]), torch.tensor([2.0])
    assert euler_step(z, dz, 0.5, 0.25).item() == pytest.approx(1.0 - 0.25 * 2.0)
    x0, noise = torch.tensor([0.5]), torch.tensor([1.0])
    assert flash_step(x0, noise, 0.25, 8.0).item() == pytest.approx(0.25 * 8.0 + 0.75 * 0.5)
    assert flash_step(x0, noise, 0.0, 8.0).item() == pytest.approx(0.5)  # the last step returns x0


def test_flash_step_is_the_official_float32_arithmetic():
    """Bit for bit the official scheduler's σ'·ε'·s + (1 - σ')·x0 with σ' a float32 tensor."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 3072, generator=g), torch.randn(1, 4, 3072, generator=g)
    sigma, scale = 0.8444218515250481, 7.3056808205821175
    official = torch.tensor(sigma)  # float32, as the official scheduler stores its σ list
    assert torch.equal(flash_step(x0, noise, sigma, scale), official * noise * scale + (1.0 - official) * x0)


def test_noise_clipping_and_scales():
    noise = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])
    bound = math.sqrt(5.0)  # unbiased std of the values above
    assert clip_noise(noise, 1.0).tolist() == pytest.approx([-bound, -1.0, 0.0, 1.0, bound])
    assert torch.equal(clip_noise(noise, 0.0), noise)
    assert flash_noise_scales(3, 8.0, 6.0) == [8.0, 7.0, 6.0]
    assert flash_noise_scales(3, 7.5, None) == [7.5, 7.5, 7.5]


def test_guided_velocity_by_hand():
    x_pred = torch.tensor([[[1.0]], [[0.0]]])  # conditional x̂0 = 1, unconditional 0
    z = torch.tensor([[[0.5]]])
    # v_c = (1 - 0.5)/0.5 = 1, v_u = -1, v = v_u + 3·(v_c - v_u) = 5
    assert guided_velocity(x_pred, z, 0.5, 3.0).item() == pytest.approx(5.0)
    assert guided_velocity(x_pred[:1], z, 0.0, 3.0).item() == pytest.approx(0.5 / SIGMA_FLOOR)


def test_first_order_unipc_is_the_euler_step():
    x, m0 = torch.tensor([1.3]), torch.tensor([0.2])
    c = unipc_coefficients(0.7, 0.3, (), corrector=False)
    euler = euler_step(x, (x - m0) / 0.7, 0.7, 0.3)
    assert unipc_update(x, m0, [], c).item() == pytest.approx(euler.item(), abs=1e-6)
    last = unipc_coefficients(0.3, 0.0, (), corrector=False)  # to σ = 0 (λ = ∞): exactly the x0 estimate
    assert unipc_update(x, m0, [], last).item() == pytest.approx(0.2)


def test_second_order_unipc_by_hand():
    s1, s0, t = 0.8, 0.6, 0.4
    lam = lambda s: math.log((1 - s) / s)  # noqa: E731
    h = lam(t) - lam(s0)
    r1 = (lam(s1) - lam(s0)) / h
    decay = (1 - s0) / s0 / ((1 - t) / t)  # e^{-h}
    assert math.exp(-h) == pytest.approx(decay)
    x, m0, m1 = torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([0.2])
    # Predictor: x_t = σt/σs·x + αt(1 - e^{-h})·m0 + αt(1 - e^{-h})·½·(m1 - m0)/r1
    gain = (1 - t) * (1 - decay)
    expected = t / s0 * 1.0 + gain * 0.5 + gain * 0.5 * (0.2 - 0.5) / r1
    predictor = unipc_coefficients(s0, t, (s1,), corrector=False)
    assert unipc_update(x, m0, [m1], predictor).item() == pytest.approx(expected, abs=1e-6)
    # Corrector weights solve [[1, 1], [r1, 1]]·ρ = b with b in φ-function form (hh = -h, B(h) = e^{hh} - 1).
    hh = -h
    b_h = math.expm1(hh)
    b1 = (math.exp(hh) - 1 - hh) / (hh * b_h)
    b2 = 2 * (math.exp(hh) - 1 - hh - hh * hh / 2) / (hh * hh * b_h)
    rho1, rho2 = unipc_coefficients(s0, t, (s1,), corrector=True).rhos
    assert rho1 + rho2 == pytest.approx(b1) and r1 * rho1 + rho2 == pytest.approx(b2)
    assert unipc_coefficients(s0, t, (), corrector=True).rhos == (0.5,)
    assert flow_lambda(0.0) == math.inf


def _gaussian_ode_error(scheduler: str, steps: int) -> float:
    """Solve the sampling ODE for 1-D Gaussian data, whose exact flow maps quantiles: x0 = μ + s·ξ."""
    mean, std, scale = 0.3, 1.0, 1.0

    def marginal_std(sigma):
        return math.hypot((1 - sigma) * std, sigma * scale)

    def denoise(z, sigma):  # E[x0 | z_σ], the ideal model
        return mean + (1 - sigma) * std ** 2 / marginal_std(sigma) ** 2 * (z - (1 - sigma) * mean)

    schedule = build_schedule(scheduler, steps, 1.0)
    xi = torch.linspace(-2, 2, 9, dtype=torch.float64)
    z = (1 - schedule.sigmas[0]) * mean + marginal_std(schedule.sigmas[0]) * xi
    solver = make_solver(scheduler, schedule, torch.Generator(), scale)
    for index in range(len(schedule)):
        sigma = schedule.sigmas[index]
        z = solver.step(index, z, (z - denoise(z, sigma)) / sigma)
    return (z - (mean + std * xi)).abs().max().item()


def test_unipc_converges_at_second_order_and_euler_at_first():
    unipc = [_gaussian_ode_error("unipc", n) for n in (10, 20, 40)]
    euler = [_gaussian_ode_error("flow_match", n) for n in (10, 20, 40)]
    assert unipc[2] < 2e-3
    assert all(a / b > 3.5 for a, b in zip(unipc, unipc[1:]))  # ≈ 4× per doubling: order ≥ 2
    assert all(1.7 < a / b < 2.5 for a, b in zip(euler, euler[1:]))  # ≈ 2× per doubling: order 1
    assert unipc[0] < euler[2]  # 10 UniPC steps beat 40 Euler steps


@pytest.mark.parametrize("scheduler", ["unipc", "flow_match", "flash"])
def test_a_perfect_x0_model_is_followed_exactly(scheduler):
    """With x̂0 ≡ c the path z_σ = (1-σ)·c + σ·n is exact for every solver (flash re-noises, so only its end)."""
    schedule = build_schedule(scheduler, 6, 3.0)
    c, n = torch.tensor([0.25, -0.5]), torch.tensor([8.0, -4.0])
    z = (1 - schedule.sigmas[0]) * c + schedule.sigmas[0] * n
    solver = make_solver(scheduler, schedule, torch.Generator().manual_seed(0), 8.0)
    for index in range(len(schedule)):
        z = solver.step(index, z, (z - c) / schedule.sigmas[index])
        if scheduler != "flash":
            expected = (1 - schedule.sigmas[index + 1]) * c + schedule.sigmas[index + 1] * n
            assert torch.allclose(z, expected, atol=1e-5)
    assert torch.allclose(z, c, atol=1e-6)
