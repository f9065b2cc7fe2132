"""Noise-level schedules of the official sampler, as pure functions (docs/sampling.md, "Schedules").

A schedule pairs the N timesteps the model is conditioned on (0..1000 scale, t_model = 1 - timestep/1000)
with the N + 1 noise levels σ the solver steps through (σ_N = 0). They differ only where the official
scheduler truncates its timesteps to integers (UniPC) while keeping float σ internally.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hidream_ft.flow.noise import shift_sigmas

NUM_TRAIN_TIMESTEPS = 1000
SCHEDULERS = ("unipc", "flow_match", "flash")

# The Dev model's 28-step schedule (official pipeline); it overrides steps and shift.
DEFAULT_TIMESTEPS = (
    999, 987, 974, 960, 945, 929, 913, 895, 877, 857, 836, 814, 790, 764, 737, 707, 675,
    640, 602, 560, 515, 464, 409, 347, 278, 199, 110, 8,
)


@dataclass(frozen=True)
class Schedule:
    timesteps: tuple[float, ...]  # N values on the 0..1000 scale, fed to the model
    sigmas: tuple[float, ...]  # N + 1 noise levels for the solver, ending at 0

    def __post_init__(self):
        if len(self.sigmas) != len(self.timesteps) + 1:
            raise ValueError("a schedule needs one more σ than timesteps")

    def __len__(self) -> int:
        return len(self.timesteps)


def unipc_schedule(steps: int, shift: float) -> Schedule:
    """The official default (flow UniPC) schedule.

    The training σ grid 0.999 … 0 is shifted once in float32, so σ_max = shift(0.999) (≈ 0.99967 at shift 3);
    then N values are spaced linearly from σ_max towards 0 (the endpoint 0 excluded) and shifted a second
    time. Timesteps are σ·1000 truncated to integers; σ stays float (rounded to float32 like the original).
    """
    _check_steps(steps, shift)
    sigma_max = float(shift_sigmas(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS), np.float32(shift)).astype(np.float32))
    sigmas = shift_sigmas(np.linspace(sigma_max, 0.0, steps + 1)[:-1], shift)
    timesteps = (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64)
    return Schedule(
        timesteps=tuple(float(t) for t in timesteps),
        sigmas=tuple(float(s) for s in np.append(sigmas, 0.0).astype(np.float32)),
    )


def flow_match_schedule(steps: int, shift: float) -> Schedule:
    """The flow-match Euler schedule (also the flash sampler's when no timestep list is given).

    N timesteps spaced linearly from 1000·σ_max to 1000·σ_min, where σ_max = 1 and σ_min = shift(1/1000) are the
    ends of the shifted training grid, then shifted again; timesteps equal 1000·σ exactly.
    """
    _check_steps(steps, shift)
    sigma_min = float(shift_sigmas(np.float32(1.0 / NUM_TRAIN_TIMESTEPS), np.float32(shift)).astype(np.float32))
    ramp = np.linspace(NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, steps) / NUM_TRAIN_TIMESTEPS
    sigmas = shift_sigmas(ramp, shift).astype(np.float32)
    return Schedule(
        timesteps=tuple(float(np.float32(s) * np.float32(NUM_TRAIN_TIMESTEPS)) for s in sigmas),
        sigmas=tuple(float(s) for s in sigmas) + (0.0,),
    )


def list_schedule(timesteps) -> Schedule:
    """An explicit timestep list (e.g. :data:`DEFAULT_TIMESTEPS`): σ = timestep/1000 rounded to float32 (the
    official scheduler stores it as a float32 tensor), then 0; no shift."""
    values = [float(t) for t in timesteps]
    if not values:
        raise ValueError("the timestep list is empty")
    if any(not 0 < t <= NUM_TRAIN_TIMESTEPS for t in values):
        raise ValueError(f"timesteps must lie in (0, {NUM_TRAIN_TIMESTEPS}], got {values}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"timesteps must be strictly decreasing, got {values}")
    return Schedule(tuple(values), tuple(float(np.float32(t / NUM_TRAIN_TIMESTEPS)) for t in values) + (0.0,))


def build_schedule(scheduler: str, steps: int, shift: float, timesteps=()) -> Schedule:
    """The schedule a sampler runs: an explicit ``timesteps`` list wins over ``steps``/``shift``."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {', '.join(SCHEDULERS)}")
    if timesteps:
        schedule = list_schedule(timesteps)
    elif scheduler == "unipc":
        schedule = unipc_schedule(steps, shift)
    else:
        schedule = flow_match_schedule(steps, shift)
    if scheduler == "unipc" and schedule.sigmas[0] >= 1.0:
        # UniPC works in log-SNR λ = log((1-σ)/σ), which is -∞ at σ = 1.
        raise ValueError("the unipc scheduler needs timesteps below 1000 (σ < 1)")
    return schedule


def _check_steps(steps: int, shift: float) -> None:
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
