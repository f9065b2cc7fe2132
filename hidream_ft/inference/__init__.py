"""Text-to-image sampling with the official HiDream-O1 inference math: schedules, solvers, LoRAs, grids and
training-time validation images (docs/sampling.md)."""

from hidream_ft.inference.grid import GridColumn, GridRow, compose_grid, grid_rows, render_grid, sample_cells
from hidream_ft.lora import lora_applied, parse_lora_spec
from hidream_ft.inference.pipeline import generate, guided_velocity, initial_noise, predict_x0, prompt_inputs
from hidream_ft.flow.schedules import DEFAULT_TIMESTEPS, Schedule, build_schedule
from hidream_ft.config.sampling import RECIPES, SamplingSettings
from hidream_ft.inference.validation import log_validation, render_validation

__all__ = [
    "DEFAULT_TIMESTEPS", "GridColumn", "GridRow", "RECIPES", "SamplingSettings", "Schedule", "build_schedule",
    "compose_grid", "generate", "grid_rows", "guided_velocity", "initial_noise", "log_validation", "lora_applied",
    "parse_lora_spec", "predict_x0", "prompt_inputs", "render_grid", "render_validation", "sample_cells",
]
