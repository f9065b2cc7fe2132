"""Text-to-image, edit and IP sampling with the official inference math: noise, model calls, guidance and the
solver loop (the math is written out in docs/sampling.md, the reference inputs in docs/edit_ip.md)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from tqdm.auto import tqdm

from hidream_ft.config.sampling import SamplingSettings
from hidream_ft.flow.objective import model_timestep
from hidream_ft.inference.references import ReferenceImages
from hidream_ft.inference.solvers import make_solver
from hidream_ft.model.conditioning import ImageConditions
from hidream_ft.model.layout import EMPTY_PROMPT, LayoutBatch, SpecialTokens, build_t2i_layout, collate_layouts
from hidream_ft.model.patches import PATCH_DIM, PATCH_SIZE, patchify, uint8_from_pixels, unpatchify
from hidream_ft.model.reference_layout import generation_inputs

SIGMA_FLOOR = 1e-3  # the official T_EPS: the velocity's σ is never below this


def initial_noise(seed: int, height: int, width: int, noise_scale: float) -> torch.Tensor:
    """The official start state: noise_scale · randn(1, 3, H, W) from a CPU generator seeded with seed + 1,
    patchified to [1, N, 3072] (fp32, CPU)."""
    generator = torch.Generator("cpu").manual_seed(seed + 1)
    noise = torch.randn(1, 3, height, width, generator=generator, dtype=torch.float32)
    return patchify(noise_scale * noise)


def step_noise_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """Where the flash sampler draws its per-step noise: as the official pipeline, which reseeds the global RNG
    with seed + 1 after drawing the start state, a fresh generator on the sampling device seeded seed + 1."""
    return torch.Generator(device).manual_seed(seed + 1)


def guided_velocity(x_pred: torch.Tensor, z: torch.Tensor, sigma: float, cfg: float) -> torch.Tensor:
    """v = (x̂0 - z)/max(σ, 1e-3) per row in fp32; two rows (conditional, unconditional) → v_u + g·(v_c - v_u)."""
    v = (x_pred.float() - z.float()) / max(sigma, SIGMA_FLOOR)
    if v.shape[0] == 1:
        return v
    if v.shape[0] != 2:
        raise ValueError(f"expected 1 or 2 prediction rows (conditional[, unconditional]), got {v.shape[0]}")
    conditional, unconditional = v[:1], v[1:]
    return unconditional + cfg * (conditional - unconditional)


def prompt_inputs(tokenizer, tokens: SpecialTokens, prompts: list[str], height: int, width: int) -> LayoutBatch:
    """One left-padded batch with a T2I layout per prompt (the text lengths may differ)."""
    return collate_layouts([build_t2i_layout(tokenizer, tokens, p, height, width) for p in prompts], tokens.pad)


def predict_x0(model: nn.Module, inputs: LayoutBatch, z: torch.Tensor, timestep: float,
               conditions: ImageConditions | None = None) -> torch.Tensor:
    """One forward for every row of ``inputs``, all on the same state ``z`` [1, N, 3072]: x̂0 [B, N, 3072].
    ``conditions``: the clean reference patches (appended after z) and ViT inputs of edit / IP rows."""
    rows = inputs.input_ids.shape[0]
    # 1 - T/1000 in float32, step by step, as the official pipeline computes it
    sigmas = torch.full((rows,), timestep, dtype=torch.float32, device=z.device) / 1000.0
    t = model_timestep(sigmas)
    return model(**generation_inputs(inputs, z.expand(rows, -1, -1), conditions), timestep=t,
                 output_tokens=inputs.num_target_tokens)


def to_uint8(z: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Patch state in [-1, 1] → image uint8 [3, H, W] on the CPU."""
    return uint8_from_pixels(unpatchify(z, height, width)[0]).cpu()


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    tokens: SpecialTokens,
    prompt: str,
    settings: SamplingSettings,
    device: torch.device | str | None = None,
    autocast: bool | None = None,
    progress: bool = False,
    references: ReferenceImages | None = None,
    initial_latent: torch.Tensor | None = None,
    noise_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample one image for ``prompt``; returns uint8 [3, height, width] on the CPU.

    The randomness is the official pipeline's for ``settings.seed`` (:func:`initial_noise`,
    :func:`step_noise_generator`) unless given: ``initial_latent`` is the start state [1, N, 3072] in patch
    layout (e.g. the official pipeline's ``z`` before its first step) and ``noise_generator`` the source of the
    flash sampler's per-step noise (drawn on the generator's device), so a given image can be reproduced.

    With ``references`` it is an edit (one image) or IP (several) generation: the unconditional row keeps the
    images and uses the caption " ", as the official pipeline does.

    The conditional and unconditional (prompt " ") rows share one batched forward. ``autocast`` (default: on
    for CUDA) runs the forwards under bf16 autocast as the official pipeline does, and then keeps z in bf16
    between steps like it; otherwise z stays fp32. The model is used in whatever train/eval mode it is in.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    autocast = device.type == "cuda" if autocast is None else autocast
    latent_dtype = torch.bfloat16 if autocast else torch.float32
    schedule = settings.schedule()
    if references is None:
        prompts = [prompt, EMPTY_PROMPT] if settings.guided else [prompt]
        inputs, conditions = prompt_inputs(tokenizer, tokens, prompts, settings.height, settings.width), None
    else:
        inputs, conditions = references.model_inputs(tokenizer, tokens, prompt, settings.height, settings.width,
                                                     settings.guided)
        conditions = conditions.to(device)
    inputs = inputs.to(device)
    if initial_latent is None:
        initial_latent = initial_noise(settings.seed, settings.height, settings.width, settings.noise_scale)
    expected_shape = (1, (settings.height // PATCH_SIZE) * (settings.width // PATCH_SIZE), PATCH_DIM)
    if tuple(initial_latent.shape) != expected_shape:
        raise ValueError(f"initial_latent has shape {list(initial_latent.shape)}; a {settings.width}x"
                         f"{settings.height} image starts from {list(expected_shape)} (patch layout)")
    z = initial_latent.to(device, latent_dtype)
    if noise_generator is None:
        noise_generator = step_noise_generator(settings.seed, device)
    solver = make_solver(settings.scheduler, schedule, noise_generator, settings.noise_scale,
                         settings.noise_scale_end, settings.noise_clip_std)
    precision = (torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False) if autocast
                 else contextlib.nullcontext())
    for index, timestep in enumerate(tqdm(schedule.timesteps, disable=not progress, desc="sampling")):
        with precision:
            x_pred = predict_x0(model, inputs, z, timestep, conditions)
        v = guided_velocity(x_pred, z, timestep / 1000.0, settings.cfg)
        z = solver.step(index, z, -v)
    return to_uint8(z, settings.height, settings.width)
