"""Token layouts: (prompt, size[, reference sizes]) → input_ids, 3-D positions and token types.

Usable on its own, e.g. to drive the model from another pipeline:

    layout = build_t2i_layout(tokenizer, tokens, "a red fox", height=1024, width=1024)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hidream_ft.model.errors import ModelInputError
from hidream_ft.model.patches import PATCH_SIZE

FIX_POINT = 4096  # image tokens sit at positions ≥ 4096 whatever the prompt length
TEXT_TYPE, TARGET_TYPE, REFERENCE_TYPE, TIMESTEP_TYPE = 0, 1, 2, 3
EMPTY_PROMPT = " "  # what the official pipeline uses for the unconditional (CFG) branch


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the layout needs, read from the tokenizer and model config (never hard-coded)."""

    boi: int
    tms: int
    vision_start: int
    vision_end: int
    image_pad: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer, config) -> "SpecialTokens":
        def lookup(token: str) -> int:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ModelInputError(f"tokenizer has no special token {token!r}; is this a HiDream-O1 tokenizer?")
            return token_id

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else lookup("<|endoftext|>")
        return cls(
            boi=lookup("<|boi_token|>"),
            tms=lookup("<|tms_token|>"),
            vision_start=config.vision_start_token_id,
            vision_end=config.vision_end_token_id,
            image_pad=config.image_token_id,
            pad=pad,
        )


@dataclass
class SampleLayout:
    input_ids: torch.Tensor  # [L] text part, ending in boi, tms
    position_ids: torch.Tensor  # [3, L + N]
    token_types: torch.Tensor  # [L + N]: 0 text, 3 tms, 1 target, 2 references
    num_target_tokens: int
    target_grid: tuple[int, int]  # (rows, columns) of the target's patches


def rope_index_fix_point(
    token_ids: list[int],
    grids: list[tuple[int, int, int]],
    skips: list[int],
    image_pad_id: int,
    fix_point: int = FIX_POINT,
) -> torch.Tensor:
    """3-D mRoPE positions [3, len(token_ids)] for a sequence whose images are placeholder runs.

    Each image is a run of ``image_pad_id`` of length t·h·w (its first slot may be a vision-start token).
    With skip 0 (a ViT condition image) the vision-start before the run is a text token and the grid follows
    it, as in stock Qwen-VL. With skip 1 (target and references) the vision-start slot is grid cell (0, 0);
    the first such image is anchored at ``fix_point`` and later ones continue after the previous grid.
    """
    pieces: list[torch.Tensor] = []
    next_position, start, anchor = 0, 0, fix_point
    for (t, h, w), skip in zip(grids, skips, strict=True):
        end = token_ids.index(image_pad_id, start)
        text_len = max(0, end - start - skip)
        base = next_position
        if text_len:
            pieces.append(torch.arange(base, base + text_len).expand(3, -1))
        if skip and anchor:
            offset, anchor = anchor, 0
        else:
            offset = base + text_len
        grid_t, grid_h, grid_w = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        grid = torch.stack([grid_t.flatten(), grid_h.flatten(), grid_w.flatten()]) + offset
        pieces.append(grid)
        next_position = int(grid.max()) + 1
        start = end + t * h * w
    if start < len(token_ids):
        base = next_position
        pieces.append(torch.arange(base, base + len(token_ids) - start).expand(3, -1))
    return torch.cat(pieces, dim=1).long()


def chat_prompt_ids(tokenizer, tokens: SpecialTokens, content, max_text_tokens: int | None = None) -> list[int]:
    """Chat-templated user turn + generation prompt + `<|boi_token|><|tms_token|>`, as token ids."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokens.boi, tokens.tms]
    if ids.count(tokens.tms) != 1:
        raise ModelInputError("the prompt must contain exactly one <|tms_token|>; remove it from the caption")
    if max_text_tokens is not None and len(ids) > max_text_tokens:
        raise ModelInputError(f"prompt is {len(ids)} tokens, over data.max_text_tokens = {max_text_tokens}")
    return ids


def truncate_caption(tokenizer, caption: str, max_caption_tokens: int) -> str:
    ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
    return caption if len(ids) <= max_caption_tokens else tokenizer.decode(ids[:max_caption_tokens])


def image_grid(height: int, width: int) -> tuple[int, int]:
    if height % PATCH_SIZE or width % PATCH_SIZE or height <= 0 or width <= 0:
        raise ModelInputError(f"image size {width}x{height} is not a positive multiple of {PATCH_SIZE}")
    return height // PATCH_SIZE, width // PATCH_SIZE


def build_t2i_layout(
    tokenizer, tokens: SpecialTokens, prompt: str, height: int, width: int, max_text_tokens: int | None = None
) -> SampleLayout:
    """The text-to-image sequence: chat prompt, boi, tms, then (H/32)·(W/32) target tokens."""
    ids = chat_prompt_ids(tokenizer, tokens, prompt, max_text_tokens)
    return layout_from_ids(ids, tokens, target=image_grid(height, width), references=[], vit_grids=[])


def layout_from_ids(
    ids: list[int],
    tokens: SpecialTokens,
    target: tuple[int, int],
    references: list[tuple[int, int]],
    vit_grids: list[tuple[int, int]],
) -> SampleLayout:
    """Positions and types for text ``ids`` (ViT placeholders included) followed by target and reference patches.

    ``vit_grids`` are the merged (h, w) grids of the ViT condition images inside ``ids``, in order.
    """
    if len(ids) >= FIX_POINT:
        raise ModelInputError(f"the text part is {len(ids)} tokens; it must stay below the {FIX_POINT} image anchor")
    num_text = len(ids)
    image_grids = [target, *references]
    if target[0] * target[1] < 2:
        # the position scan needs an <|image_pad|> after the placeholder vision-start of every image
        raise ModelInputError(f"target image of {target[1] * 32}x{target[0] * 32} is a single patch; use at least 2 patches")
    padded = list(ids)
    for h, w in image_grids:
        padded += [tokens.vision_start] + [tokens.image_pad] * (h * w - 1)
    grids = [(1, h, w) for h, w in vit_grids] + [(1, h, w) for h, w in image_grids]
    skips = [0] * len(vit_grids) + [1] * len(image_grids)
    positions = rope_index_fix_point(padded, grids, skips, tokens.image_pad)
    num_target = target[0] * target[1]
    num_refs = sum(h * w for h, w in references)
    types = torch.cat([
        torch.full((num_text,), TEXT_TYPE),
        torch.full((num_target,), TARGET_TYPE),
        torch.full((num_refs,), REFERENCE_TYPE),
    ])
    types[num_text - 1] = TIMESTEP_TYPE
    return SampleLayout(torch.tensor(ids, dtype=torch.long), positions, types.long(), num_target, target)


@dataclass
class LayoutBatch:
    """Several layouts as model inputs: text left-padded so every sample's image tokens line up."""

    input_ids: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [3, B, T + N]
    token_types: torch.Tensor  # [B, T + N]
    attention_mask: torch.Tensor | None  # [B, T + N], None when nothing is padded
    num_target_tokens: int
    target_grids: list[tuple[int, int]]  # each sample's target patch grid (rows, columns)

    def to(self, device: torch.device | str) -> "LayoutBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return LayoutBatch(move(self.input_ids), move(self.position_ids), move(self.token_types),
                           move(self.attention_mask), self.num_target_tokens, self.target_grids)

    def model_inputs(self) -> dict:
        return dict(input_ids=self.input_ids, position_ids=self.position_ids, token_types=self.token_types,
                    attention_mask=self.attention_mask)


def collate_layouts(layouts: list[SampleLayout], pad_id: int) -> LayoutBatch:
    """Left-pad the text parts; all samples must share the same image-token count (one bucket)."""
    image_tokens = {len(lay.token_types) - len(lay.input_ids) for lay in layouts}
    targets = {lay.num_target_tokens for lay in layouts}
    if len(image_tokens) != 1 or len(targets) != 1:
        raise ValueError("a batch must use one image size per slot (bucket); got different image token counts")
    width = max(len(lay.input_ids) for lay in layouts)
    ids, positions, types, valid = [], [], [], []
    for lay in layouts:
        pad = width - len(lay.input_ids)
        ids.append(torch.cat([torch.full((pad,), pad_id, dtype=torch.long), lay.input_ids]))
        positions.append(torch.cat([torch.zeros(3, pad, dtype=torch.long), lay.position_ids], dim=1))
        types.append(torch.cat([torch.zeros(pad, dtype=torch.long), lay.token_types]))
        valid.append(torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(len(lay.token_types), dtype=torch.long)]))
    mask = torch.stack(valid)
    return LayoutBatch(
        input_ids=torch.stack(ids),
        position_ids=torch.stack(positions, dim=1),
        token_types=torch.stack(types),
        attention_mask=None if bool(mask.all()) else mask,
        num_target_tokens=targets.pop(),
        target_grids=[lay.target_grid for lay in layouts],
    )


@dataclass
class PackedLayout:
    """Several samples back to back in one row of fixed length, padded at the tail. Each sample keeps the
    token ids, positions and token types it has alone (text, boi, tms, target slots, reference slots), and
    ``document_ids`` keep its attention within itself."""

    input_ids: torch.Tensor  # [1, S]: each sample's text then pad ids on its image slots; pad ids on the tail
    position_ids: torch.Tensor  # [3, 1, S]
    token_types: torch.Tensor  # [1, S]
    document_ids: torch.Tensor  # [1, S]: the sample's index in the row, -1 on the tail padding
    attention_mask: torch.Tensor | None  # [1, S], None when the samples fill the row
    target_counts: list[int]  # target tokens of each sample, in row order
    image_counts: list[int]  # image slots (target + references) of each sample
    target_grids: list[tuple[int, int]]  # each sample's target patch grid (rows, columns), in row order

    def to(self, device: torch.device | str) -> "PackedLayout":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return PackedLayout(move(self.input_ids), move(self.position_ids), move(self.token_types),
                            move(self.document_ids), move(self.attention_mask), self.target_counts,
                            self.image_counts, self.target_grids)

    def model_inputs(self) -> dict:
        return dict(input_ids=self.input_ids, position_ids=self.position_ids, token_types=self.token_types,
                    attention_mask=self.attention_mask, document_ids=self.document_ids)

    def image_inputs(self, targets: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """The forward's ``vinputs`` [P, 3072]: each sample's target tokens, then its reference tokens, in row
        order, from all targets [Σ target_counts, 3072] and all references [Σ reference tokens, 3072]."""
        reference_counts = [images - target for images, target in zip(self.image_counts, self.target_counts)]
        pairs = zip(targets.split(self.target_counts), references.split(reference_counts))
        return torch.cat([part for pair in pairs for part in pair])


def pack_layouts(layouts: list[SampleLayout], pad_id: int, length: int) -> PackedLayout:
    """One row of ``length`` tokens holding ``layouts`` in order, padded at the tail."""
    used = sum(len(lay.token_types) for lay in layouts)
    if used > length:
        raise ValueError(f"{len(layouts)} samples take {used} tokens, over the packed row length {length}")
    ids, positions, types, documents = [], [], [], []
    for index, lay in enumerate(layouts):
        num_images = len(lay.token_types) - len(lay.input_ids)
        ids += [lay.input_ids, torch.full((num_images,), pad_id, dtype=torch.long)]
        positions.append(lay.position_ids)
        types.append(lay.token_types)
        documents.append(torch.full((len(lay.token_types),), index, dtype=torch.long))
    tail = length - used
    ids.append(torch.full((tail,), pad_id, dtype=torch.long))
    positions.append(torch.zeros(3, tail, dtype=torch.long))
    types.append(torch.zeros(tail, dtype=torch.long))
    documents.append(torch.full((tail,), -1, dtype=torch.long))
    document_ids = torch.cat(documents)[None]
    return PackedLayout(
        input_ids=torch.cat(ids)[None],
        position_ids=torch.cat(positions, dim=1)[:, None],
        token_types=torch.cat(types)[None],
        document_ids=document_ids,
        attention_mask=(document_ids >= 0).long() if tail else None,
        target_counts=[lay.num_target_tokens for lay in layouts],
        image_counts=[len(lay.token_types) - len(lay.input_ids) for lay in layouts],
        target_grids=[lay.target_grid for lay in layouts],
    )
