"""The noise level's definitions that the configuration needs too, in plain arithmetic (no torch): the official
noise scale and the resolution shift of σ, which works on floats, numpy arrays and tensors alike."""

from __future__ import annotations

NOISE_SCALE = 8.0  # s: the official noise scale, for training and as the sampler's default


def shift_sigmas(sigmas, shift: float):
    """The flow-matching resolution shift σ' = s·σ / (1 + (s - 1)·σ); shift 1 is the identity."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1 + (shift - 1) * sigmas)
