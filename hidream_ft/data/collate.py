"""Samples → model inputs, inside the data-loader workers (tokenisation, positions and ViT preprocessing stay
off the GPU loop)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from hidream_ft.config import ConfigError, DiffusionConfig
from hidream_ft.flow.objective import add_noise, draw_packed_sigmas_and_noise, draw_sigmas_and_noise
from hidream_ft.data.planner import PackedSamples
from hidream_ft.model.errors import ModelInputError
from hidream_ft.model.patches import PATCH_SIZE, patchify, pixels_from_uint8, uint8_from_pixels
from hidream_ft.model.layout import (
    LayoutBatch, PackedLayout, SampleLayout, SpecialTokens, build_t2i_layout, chat_prompt_ids, collate_layouts,
    truncate_caption,
)
from hidream_ft.model.conditioning import ConditionProcessor, ImageConditions
from hidream_ft.model.reference_layout import (
    ReferenceLayout, build_reference_layout, collate_reference_layouts, generation_inputs, pack_sample_layouts,
)


@contextmanager
def _naming_the_sample(key: str):
    """A caption or references that the layout refuses: the sample's key says which to fix."""
    try:
        yield
    except ModelInputError as e:
        raise ModelInputError(f"sample {key}: {e}") from None


def _copy_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An asynchronous host-to-device copy from page-locked memory when the device is CUDA (the DataLoader's
    pin-memory thread has usually pinned the batch already)."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@dataclasses.dataclass
class TrainBatch:
    layout: LayoutBatch | PackedLayout
    # [B, N_target, 3072] clean target patches ([Σ N_target, 3072] in row order when packed) as the worker sends
    # them: 8-bit codes, a quarter of float32 to pass between processes and copy to the device; float32 pixels
    # when they are not 8-bit values (synthetic samples). ``x0`` gives float32 pixels wherever the batch is.
    target: torch.Tensor
    weights: torch.Tensor  # [B] per-sample loss weights
    keys: list[str]
    noise_seeds: list[int]  # one per sample: its σ and ε are drawn from this seed
    conditions: ImageConditions | None = None  # edit / IP batches: clean reference patches and ViT inputs
    # Loss weight of each target token ([B, N_target], [Σ N_target] when packed) from the samples' masks;
    # None when every token weighs 1 (no masks, or white ones): the loss is then the plain mean, bit for bit.
    token_weights: torch.Tensor | None = None
    # Prior preservation (docs/quality.md): the same images under each sample's preservation prompt.
    preservation_layout: LayoutBatch | PackedLayout | None = None

    @property
    def size(self) -> int:
        return len(self.keys)

    @property
    def x0(self) -> torch.Tensor:
        """The clean target patches as float32 in [-1, 1], computed where the batch is (the device after ``to``)."""
        return pixels_from_uint8(self.target) if self.target.dtype == torch.uint8 else self.target

    @property
    def target_tokens(self) -> int:
        """Target (predicted) tokens in the micro-batch."""
        return self.target.shape[:-1].numel()

    @property
    def packed_target_counts(self) -> list[int] | None:
        """Target tokens of each sample of a packed batch; None for an ordinary one."""
        return self.layout.target_counts if isinstance(self.layout, PackedLayout) else None

    def to(self, device: torch.device | str) -> "TrainBatch":
        device = torch.device(device)
        return TrainBatch(self.layout.to(device), _copy_to(self.target, device), _copy_to(self.weights, device),
                          self.keys, self.noise_seeds, None if self.conditions is None else self.conditions.to(device),
                          None if self.token_weights is None else _copy_to(self.token_weights, device),
                          None if self.preservation_layout is None else self.preservation_layout.to(device))

    def pin_memory(self) -> "TrainBatch":
        """Called by the DataLoader's pin-memory thread (``data.pin_memory`` on CUDA machines)."""
        return dataclasses.replace(
            self, target=self.target.pin_memory(), weights=self.weights.pin_memory(),
            token_weights=None if self.token_weights is None else self.token_weights.pin_memory())

    def noised(self, diffusion: DiffusionConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Draw σ and ε of every sample from its seed and noise the target: (z_σ, σ per sample, the model's output
        arguments). Drawing again gives the same tensors."""
        x0 = self.x0
        sigma_options = dict(method=diffusion.timestep_sampling, logit_mean=diffusion.logit_mean,
                             logit_std=diffusion.logit_std, shift=diffusion.shift, sigma_min=diffusion.sigma_min,
                             sigma_max=diffusion.sigma_max)
        counts = self.packed_target_counts
        if counts is None:
            sigmas, noise = draw_sigmas_and_noise(self.noise_seeds, x0.shape[1:], x0.device, **sigma_options)
            token_sigmas, output = sigmas, dict(output_tokens=self.layout.num_target_tokens)
        else:  # a packed row: each sample draws what it draws alone; its σ applies to each of its tokens
            sigmas, noise = draw_packed_sigmas_and_noise(self.noise_seeds, counts, x0.shape[-1], x0.device,
                                                         **sigma_options)
            token_sigmas, output = sigmas.repeat_interleave(torch.tensor(counts, device=sigmas.device)), {}
        return add_noise(x0, noise, token_sigmas, diffusion.noise_scale), sigmas, output

    def model_inputs(self, noisy_target: torch.Tensor) -> dict:
        """``HiDreamO1.forward`` keyword arguments but the timestep; the references follow the noisy target."""
        return generation_inputs(self.layout, noisy_target, self.conditions)


def _token_weights(sample) -> torch.Tensor:
    """[N_target] loss weights of the sample's target tokens: its mask's mean over each patch, in
    :func:`patchify`'s row-major token order; all ones without a mask."""
    if getattr(sample, "mask", None) is None:
        _, height, width = sample.pixels.shape
        return torch.ones((height // PATCH_SIZE) * (width // PATCH_SIZE))
    return torch.nn.functional.avg_pool2d(sample.mask[None, None], PATCH_SIZE).flatten()


class TextToImageCollator:
    """Picklable: holds the tokenizer and special-token ids; builds the T2I layout for every sample."""

    def __init__(self, tokenizer, tokens: SpecialTokens, max_text_tokens: int):
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.max_text_tokens = max_text_tokens
        template_tokens = len(chat_prompt_ids(tokenizer, tokens, ""))
        if template_tokens >= max_text_tokens:
            raise ConfigError(f"data.max_text_tokens = {max_text_tokens} leaves no room for a caption")
        self.max_caption_tokens = max_text_tokens - template_tokens

    def caption(self, sample) -> str:
        # Over-long captions are cut at the token budget rather than dropping the image.
        return truncate_caption(self.tokenizer, sample.caption, self.max_caption_tokens)

    def __call__(self, samples) -> TrainBatch:
        layouts = [self._t2i_layout(s, self.caption(s)) for s in samples]
        return self.batch(samples, collate_layouts(layouts, self.tokens.pad))

    def _t2i_layout(self, sample, caption: str) -> SampleLayout:
        _, height, width = sample.pixels.shape
        with _naming_the_sample(sample.key):
            return build_t2i_layout(self.tokenizer, self.tokens, caption, height, width, self.max_text_tokens)

    def batch(self, samples, layout: LayoutBatch | PackedLayout,
              conditions: ImageConditions | None = None) -> TrainBatch:
        if isinstance(layout, PackedLayout):
            x0 = torch.cat([patchify(s.pixels[None])[0] for s in samples])
            token_weights = torch.cat([_token_weights(s) for s in samples])
        else:
            x0 = patchify(torch.stack([s.pixels for s in samples]))
            token_weights = torch.stack([_token_weights(s) for s in samples])
        codes = uint8_from_pixels(x0)
        return TrainBatch(
            layout=layout,
            target=codes if torch.equal(pixels_from_uint8(codes), x0) else x0,
            weights=torch.tensor([s.weight for s in samples], dtype=torch.float32),
            keys=[s.key for s in samples],
            noise_seeds=[s.noise_seed for s in samples],
            conditions=conditions,
            token_weights=None if bool((token_weights == 1).all()) else token_weights,
        )


class TrainCollator(TextToImageCollator):
    """Text-to-image batches exactly as :class:`TextToImageCollator` builds them; batches whose samples carry
    ``references`` get the edit / IP layout (ViT condition tokens in the prompt, clean reference patches after
    the target). A batch is one or the other: the data pipeline groups samples by shape.

    The ViT placeholder tokens do not count against ``max_text_tokens``, which bounds the caption alone; the
    reference count bounds them (at most 10 images of 64-144 tokens).

    :class:`PackedSamples` (a stage with ``max_tokens``, docs/data.md "Packing") become one packed row of
    their ``row_tokens``, samples of any sizes and tasks back to back.

    With ``preservation_prompts`` (prior preservation, docs/quality.md) every batch also carries the layout of
    its samples under a preservation prompt each (picked by the sample's noise seed) in place of the caption:
    built here, in the workers, so that the training step tokenizes nothing.
    """

    def __init__(self, tokenizer, tokens: SpecialTokens, max_text_tokens: int,
                 processor: ConditionProcessor, preservation_prompts: Sequence[str] = ()):
        super().__init__(tokenizer, tokens, max_text_tokens)
        self.processor = processor
        self.preservation_prompts = [truncate_caption(tokenizer, prompt, self.max_caption_tokens)
                                     for prompt in preservation_prompts]

    def __call__(self, samples) -> TrainBatch:
        batch = self.batch(samples, *self._layouts(samples, [self.caption(s) for s in samples]))
        if self.preservation_prompts:
            prompts = [self.preservation_prompts[s.noise_seed % len(self.preservation_prompts)] for s in samples]
            # The references' conditions do not depend on the prompt: the batch's serve both layouts.
            batch.preservation_layout, _ = self._layouts(samples, prompts)
        return batch

    def _layouts(self, samples, captions: list[str]) -> tuple[LayoutBatch | PackedLayout, ImageConditions | None]:
        if isinstance(samples, PackedSamples):
            items = [self._reference_layout(s, c) if getattr(s, "references", None) else self._t2i_layout(s, c)
                     for s, c in zip(samples, captions)]
            return pack_sample_layouts(items, self.tokens.pad, samples.row_tokens)
        with_references = [bool(getattr(s, "references", None)) for s in samples]
        if not any(with_references):
            return collate_layouts([self._t2i_layout(s, c) for s, c in zip(samples, captions)], self.tokens.pad), None
        if not all(with_references):
            plain = [s.key for s, has in zip(samples, with_references) if not has]
            raise ValueError(f"a batch mixes samples with and without references ({plain[0]} has none); "
                             "the data pipeline groups samples by target and reference sizes")
        return collate_reference_layouts([self._reference_layout(s, c) for s, c in zip(samples, captions)],
                                         self.tokens.pad)

    def _reference_layout(self, sample, caption: str) -> ReferenceLayout:
        _, height, width = sample.pixels.shape
        with _naming_the_sample(sample.key):
            return build_reference_layout(self.tokenizer, self.tokens, self.processor, caption, height, width,
                                          sample.references)
