"""Solvers of the flow path z_σ = (1 - σ)·x0 + σ·s·ε: step i takes z at σ_i and dz/dσ (CFG applied) and
returns z at σ_{i+1}. The step math is in pure functions; the classes keep a multistep method's history
(docs/sampling.md, "Solvers")."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch

from hidream_ft.flow.schedules import Schedule


def x0_from_derivative(z: torch.Tensor, dz_dsigma: torch.Tensor, sigma: float) -> torch.Tensor:
    """The clean estimate the solvers work with: x0 = z - σ·dz/dσ (fp32)."""
    return z.float() - sigma * dz_dsigma.float()


def euler_step(z: torch.Tensor, dz_dsigma: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """Flow-match Euler: z ← z + (σ_next - σ)·dz/dσ, computed in fp32."""
    return z.float() + (sigma_next - sigma) * dz_dsigma.float()


def clip_noise(noise: torch.Tensor, clip_std: float) -> torch.Tensor:
    """Clamp to ±clip_std·std(noise) over the whole tensor; clip_std ≤ 0 leaves the noise untouched."""
    if clip_std <= 0:
        return noise
    bound = clip_std * noise.std().item()
    return noise.clamp(-bound, bound)


def flash_step(x0: torch.Tensor, noise: torch.Tensor, sigma_next: float, noise_scale: float) -> torch.Tensor:
    """The Dev model's x0 re-noising step: the flow path at σ_next with fresh noise ε'.

    Not :func:`hidream_ft.flow.objective.add_noise`: the official scheduler holds σ as a float32 tensor and multiplies (σ·ε')·s, and
    this step repeats that arithmetic so that its result is bitwise the official one.
    """
    sigma = torch.tensor(sigma_next, dtype=torch.float32, device=x0.device)
    return sigma * noise.float() * noise_scale + (1.0 - sigma) * x0.float()


def flow_lambda(sigma: float) -> float:
    """Log signal-to-noise ratio λ = log((1 - σ)/σ) of the flow path; +∞ at σ = 0."""
    if sigma <= 0.0:
        return math.inf
    return math.log1p(-sigma) - math.log(sigma)


@dataclass(frozen=True)
class UniPCCoefficients:
    """z_new = sample·x + x0·m0 + residual·(Σ_k rho_k·(m_k - m0)/r_k [+ rho_last·(m_t - m0)])."""

    sample: float
    x0: float
    residual: float
    ratios: tuple[float, ...]  # r_k = (λ_{s_k} - λ_{s0})/h for each older x0 estimate m_k
    rhos: tuple[float, ...]


def unipc_coefficients(sigma_s0: float, sigma_t: float, older_sigmas: tuple[float, ...], corrector: bool):
    """Scalars of one UniP (predictor) or UniC (corrector) bh2 update from σ_s0 to σ_t.

    ``older_sigmas`` are the noise levels of the x0 estimates before m0 that the update uses (at most one:
    order 2). With h = λ_t - λ_s0 and hh = -h (x0 prediction): φ1 = e^{hh} - 1 and B(h) = e^{hh} - 1 (bh2);
    the order-p conditions b_i = (h·φ_{i+1}(hh) · i!)/B(h) give the weights ρ. The predictor of order 2
    uses ρ = 1/2; the corrector of order 1 uses ρ = 1/2 and of order 2 solves [[1, 1], [r1, 1]]·ρ = b.
    """
    if len(older_sigmas) > 1:
        raise ValueError("only UniPC of order ≤ 2 is implemented")
    lambda_s0 = flow_lambda(sigma_s0)
    h = flow_lambda(sigma_t) - lambda_s0
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh)
    ratios = tuple((flow_lambda(s) - lambda_s0) / h for s in older_sigmas)
    order = len(older_sigmas) + 1

    b, h_phi_k, factorial = [], h_phi_1 / hh - 1.0, 1
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial

    if corrector and order == 1:
        rhos = (0.5,)
    elif corrector:
        r1 = ratios[0]
        # Solve [[1, 1], [r1, 1]]·(ρ1, ρ2) = (b1, b2) by hand; r1 < 0 < 1, so the system is never singular.
        rho1 = (b[0] - b[1]) / (1.0 - r1)
        rhos = (rho1, b[0] - rho1)
    else:
        rhos = (0.5,) if order == 2 else ()

    alpha_t = 1.0 - sigma_t
    return UniPCCoefficients(
        sample=sigma_t / sigma_s0, x0=-alpha_t * h_phi_1, residual=-alpha_t * b_h, ratios=ratios, rhos=rhos,
    )


def unipc_update(
    x: torch.Tensor,
    m0: torch.Tensor,
    older: list[torch.Tensor],
    coefficients: UniPCCoefficients,
    m_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply :func:`unipc_coefficients` (fp32): ``m_t`` is the corrector's new x0 estimate, None for UniP."""
    c = coefficients
    residual = torch.zeros_like(m0)
    for rho, ratio, m_k in zip(c.rhos, c.ratios, older):
        residual = residual + rho * (m_k - m0) / ratio
    if m_t is not None:
        residual = residual + c.rhos[-1] * (m_t - m0)
    return c.sample * x.float() + c.x0 * m0 + c.residual * residual


class Solver(abc.ABC):
    """Steps z through a :class:`Schedule`: ``step(i, z at σ_i, dz/dσ) → z at σ_{i+1}`` (in z's dtype)."""

    def __init__(self, schedule: Schedule):
        self.sigmas = schedule.sigmas

    @abc.abstractmethod
    def step(self, index: int, z: torch.Tensor, dz_dsigma: torch.Tensor) -> torch.Tensor: ...


class EulerSolver(Solver):
    def step(self, index, z, dz_dsigma):
        return euler_step(z, dz_dsigma, self.sigmas[index], self.sigmas[index + 1]).to(z.dtype)


class FlashSolver(Solver):
    """x0 re-noising with fresh noise drawn from ``generator``, on its device."""

    def __init__(self, schedule: Schedule, generator: torch.Generator, noise_scales: list[float], clip_std: float):
        super().__init__(schedule)
        if len(noise_scales) != len(schedule):
            raise ValueError("the flash solver needs one noise scale per step")
        self.generator = generator
        self.noise_scales = noise_scales
        self.clip_std = clip_std

    def step(self, index, z, dz_dsigma):
        x0 = x0_from_derivative(z, dz_dsigma, self.sigmas[index])
        noise = torch.randn(z.shape, generator=self.generator, dtype=torch.float32, device=self.generator.device)
        noise = noise.to(z.device)
        noise = clip_noise(noise, self.clip_std)
        return flash_step(x0, noise, self.sigmas[index + 1], self.noise_scales[index]).to(z.dtype)


class UniPCSolver(Solver):
    """Multistep UniPC (order 2, bh2, x0 prediction) with the UniC corrector, for flow models."""

    order = 2

    def __init__(self, schedule: Schedule):
        super().__init__(schedule)
        self.x0_history: list[torch.Tensor] = []  # newest last, at most `order` entries
        self.last_sample: torch.Tensor | None = None
        self.last_order = 0

    def step(self, index, z, dz_dsigma):
        sigmas = self.sigmas
        num_steps = len(sigmas) - 1
        x0 = x0_from_derivative(z, dz_dsigma, sigmas[index])
        if index > 0:
            # UniC: redo the previous step with the x0 estimate at its end point, then predict from there.
            older_sigmas = tuple(sigmas[index - 2:index - 1]) if self.last_order == 2 else ()
            coefficients = unipc_coefficients(sigmas[index - 1], sigmas[index], older_sigmas, corrector=True)
            older = self.x0_history[-2:-1] if self.last_order == 2 else []
            z = unipc_update(self.last_sample, self.x0_history[-1], older, coefficients, m_t=x0).to(z.dtype)
        self.x0_history = (self.x0_history + [x0])[-self.order:]
        # Lower order on the first step (no history) and on the last (σ_next = 0, where λ is infinite).
        order = min(self.order, num_steps - index, index + 1)
        self.last_sample, self.last_order = z, order
        older_sigmas = (sigmas[index - 1],) if order == 2 else ()
        coefficients = unipc_coefficients(sigmas[index], sigmas[index + 1], older_sigmas, corrector=False)
        older = self.x0_history[-2:-1] if order == 2 else []
        return unipc_update(z, x0, older, coefficients).to(z.dtype)


def make_solver(
    scheduler: str,
    schedule: Schedule,
    generator: torch.Generator,
    noise_scale: float,
    noise_scale_end: float | None = None,
    noise_clip_std: float = 0.0,
) -> Solver:
    if scheduler == "unipc":
        return UniPCSolver(schedule)
    if scheduler == "flow_match":
        return EulerSolver(schedule)
    if scheduler == "flash":
        return FlashSolver(schedule, generator, flash_noise_scales(len(schedule), noise_scale, noise_scale_end),
                           noise_clip_std)
    raise ValueError(f"unknown scheduler {scheduler!r}; expected unipc, flow_match or flash")


def flash_noise_scales(steps: int, start: float, end: float | None) -> list[float]:
    """Re-noising scale per step, linear from ``start`` (step 0) to ``end`` (last step); constant if end is None."""
    end = start if end is None else end
    if steps == 1:
        return [start]
    return [start + (end - start) * i / (steps - 1) for i in range(steps)]
