"""Sampling settings shared by the CLI, the grid renderer and training-time validation images."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hidream_ft.config.toml import ConfigError
from hidream_ft.flow.noise import NOISE_SCALE
from hidream_ft.flow.schedules import DEFAULT_TIMESTEPS, SCHEDULERS, Schedule, build_schedule
from hidream_ft.model.geometry import PATCH_SIZE


@dataclass
class SamplingSettings:
    steps: int = 50
    cfg: float = 5.0
    shift: float = 3.0
    scheduler: Literal["unipc", "flow_match", "flash"] = "unipc"
    seed: int = 0
    width: int = 1024
    height: int = 1024
    noise_scale: float = NOISE_SCALE  # initial noise, and the flash sampler's re-noising scale at its first step
    noise_scale_end: float | None = None  # flash: re-noising scale at the last step (None: = noise_scale)
    noise_clip_std: float = 0.0  # flash: clamp re-noising to ±this·std (0: off)
    timesteps: list[int] = field(default_factory=list)  # explicit schedule; overrides steps and shift

    @property
    def guided(self) -> bool:
        """Classifier-free guidance runs (and costs an unconditional row) only for cfg > 1."""
        return self.cfg > 1.0

    def schedule(self) -> Schedule:
        return build_schedule(self.scheduler, self.steps, self.shift, self.timesteps)

    def validate(self, where: str = "sampling") -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if value <= 0 or value % PATCH_SIZE:
                raise ConfigError(f"{where}.{name}: must be a positive multiple of {PATCH_SIZE}, got {value}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"{where}.scheduler: {self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        for name in ("noise_scale", "noise_scale_end"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{where}.{name}: must be > 0, got {value}")
        if self.noise_clip_std < 0:
            raise ConfigError(f"{where}.noise_clip_std: must be ≥ 0 (0 = no clipping), got {self.noise_clip_std}")
        if self.cfg < 0:
            raise ConfigError(f"{where}.cfg: must be ≥ 0, got {self.cfg}")
        if self.shift <= 0:
            raise ConfigError(f"{where}.shift: must be > 0, got {self.shift}")
        if self.seed < 0:
            raise ConfigError(f"{where}.seed: must be ≥ 0, got {self.seed}")
        try:
            self.schedule()
        except ValueError as e:
            key = "timesteps" if self.timesteps else "steps"
            raise ConfigError(f"{where}.{key}: {e}") from None


# The official recipes (spec §5): the full model, the Dev model (main branch) and Dev-2604.
_DEV = dict(steps=28, cfg=0.0, shift=1.0, scheduler="flash", timesteps=list(DEFAULT_TIMESTEPS))
RECIPES: dict[str, dict] = {
    "full": dict(steps=50, cfg=5.0, shift=3.0, scheduler="unipc", noise_scale=NOISE_SCALE),
    "dev": dict(_DEV, noise_scale=7.5, noise_clip_std=2.5),
    "dev-2604": dict(_DEV, noise_scale=NOISE_SCALE, noise_clip_std=8.0),
}
