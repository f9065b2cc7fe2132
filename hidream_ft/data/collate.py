"""Samples → model inputs, inside the data-loader workers (tokenisation and positions stay off the GPU loop)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from hidream_ft.diffusion import patchify
from hidream_ft.model.layout import (
    LayoutBatch, SpecialTokens, build_t2i_layout, chat_prompt_ids, collate_layouts, truncate_caption,
)


@dataclass
class TrainBatch:
    layout: LayoutBatch
    x0: torch.Tensor  # [B, N_target, 3072] clean target patches
    weights: torch.Tensor  # [B] per-sample loss weights
    keys: list[str]
    noise_seeds: list[int]  # one per sample: its σ and ε are drawn from this seed

    @property
    def size(self) -> int:
        return self.x0.shape[0]

    def to(self, device: torch.device | str) -> "TrainBatch":
        return TrainBatch(self.layout.to(device), self.x0.to(device, non_blocking=True),
                          self.weights.to(device, non_blocking=True), self.keys, self.noise_seeds)


def noise_seed(seed: int, key: str, epoch: int) -> int:
    """A stable 63-bit seed for one sample in one epoch (Python's hash() is salted per process)."""
    return (seed * 1_000_003 + zlib.crc32(f"{key}\0{epoch}".encode())) % (2**63)


class TextToImageCollator:
    """Picklable: holds the tokenizer and special-token ids; builds the T2I layout for every sample."""

    def __init__(self, tokenizer, tokens: SpecialTokens, max_text_tokens: int, seed: int):
        self.seed = seed
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.max_text_tokens = max_text_tokens
        template_tokens = len(chat_prompt_ids(tokenizer, tokens, ""))
        if template_tokens >= max_text_tokens:
            raise ValueError(f"data.max_text_tokens = {max_text_tokens} leaves no room for a caption")
        self.max_caption_tokens = max_text_tokens - template_tokens

    def __call__(self, samples) -> TrainBatch:
        layouts = []
        for sample in samples:
            _, height, width = sample.pixels.shape
            # Over-long captions are cut at the token budget rather than dropping the image.
            caption = truncate_caption(self.tokenizer, sample.caption, self.max_caption_tokens)
            layouts.append(build_t2i_layout(self.tokenizer, self.tokens, caption, height, width, self.max_text_tokens))
        return TrainBatch(
            layout=collate_layouts(layouts, self.tokens.pad),
            x0=patchify(torch.stack([s.pixels for s in samples])),
            weights=torch.tensor([s.weight for s in samples], dtype=torch.float32),
            keys=[s.key for s in samples],
            noise_seeds=[noise_seed(self.seed, s.key, s.epoch) for s in samples],
        )
