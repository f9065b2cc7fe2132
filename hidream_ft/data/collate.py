"""Samples → model inputs, inside the data-loader workers (tokenisation, positions and ViT preprocessing stay
off the GPU loop)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from hidream_ft.config import ConfigError
from hidream_ft.model.errors import ModelInputError
from hidream_ft.model.patches import patchify
from hidream_ft.model.layout import (
    LayoutBatch, SpecialTokens, build_t2i_layout, chat_prompt_ids, collate_layouts, truncate_caption,
)
from hidream_ft.model.conditioning import ConditionProcessor, ImageConditions
from hidream_ft.model.reference_layout import build_reference_layout, collate_reference_layouts, generation_inputs


@contextmanager
def _naming_the_sample(key: str):
    """A caption or references that the layout refuses: the sample's key says which to fix."""
    try:
        yield
    except ModelInputError as e:
        raise ModelInputError(f"sample {key}: {e}") from None


@dataclass
class TrainBatch:
    layout: LayoutBatch
    x0: torch.Tensor  # [B, N_target, 3072] clean target patches
    weights: torch.Tensor  # [B] per-sample loss weights
    keys: list[str]
    noise_seeds: list[int]  # one per sample: its σ and ε are drawn from this seed
    conditions: ImageConditions | None = None  # edit / IP batches: clean reference patches and ViT inputs

    @property
    def size(self) -> int:
        return self.x0.shape[0]

    def to(self, device: torch.device | str) -> "TrainBatch":
        return TrainBatch(self.layout.to(device), self.x0.to(device, non_blocking=True),
                          self.weights.to(device, non_blocking=True), self.keys, self.noise_seeds,
                          None if self.conditions is None else self.conditions.to(device))

    def model_inputs(self, noisy_target: torch.Tensor) -> dict:
        """``HiDreamO1.forward`` keyword arguments but the timestep; the references follow the noisy target."""
        return generation_inputs(self.layout, noisy_target, self.conditions)


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
        layouts = []
        for sample in samples:
            _, height, width = sample.pixels.shape
            with _naming_the_sample(sample.key):
                layouts.append(build_t2i_layout(self.tokenizer, self.tokens, self.caption(sample), height, width,
                                                self.max_text_tokens))
        return self.batch(samples, collate_layouts(layouts, self.tokens.pad))

    def batch(self, samples, layout: LayoutBatch, conditions: ImageConditions | None = None) -> TrainBatch:
        return TrainBatch(
            layout=layout,
            x0=patchify(torch.stack([s.pixels for s in samples])),
            weights=torch.tensor([s.weight for s in samples], dtype=torch.float32),
            keys=[s.key for s in samples],
            noise_seeds=[s.noise_seed for s in samples],
            conditions=conditions,
        )


class TrainCollator(TextToImageCollator):
    """Text-to-image batches exactly as :class:`TextToImageCollator` builds them; batches whose samples carry
    ``references`` get the edit / IP layout (ViT condition tokens in the prompt, clean reference patches after
    the target). A batch is one or the other: the data pipeline groups samples by shape.

    The ViT placeholder tokens do not count against ``max_text_tokens``, which bounds the caption alone; the
    reference count bounds them (at most 10 images of 64-144 tokens).
    """

    def __init__(self, tokenizer, tokens: SpecialTokens, max_text_tokens: int,
                 processor: ConditionProcessor):
        super().__init__(tokenizer, tokens, max_text_tokens)
        self.processor = processor

    def __call__(self, samples) -> TrainBatch:
        with_references = [bool(getattr(s, "references", None)) for s in samples]
        if not any(with_references):
            return super().__call__(samples)
        if not all(with_references):
            plain = [s.key for s, has in zip(samples, with_references) if not has]
            raise ValueError(f"a batch mixes samples with and without references ({plain[0]} has none); "
                             "the data pipeline groups samples by target and reference sizes")
        items = []
        for sample in samples:
            _, height, width = sample.pixels.shape
            with _naming_the_sample(sample.key):
                items.append(build_reference_layout(self.tokenizer, self.tokens, self.processor,
                                                    self.caption(sample), height, width, sample.references))
        layout, conditions = collate_reference_layouts(items, self.tokens.pad)
        return self.batch(samples, layout, conditions)
