"""The edit / IP sequence: prompt with ViT condition tokens, target, then clean reference patches; and the
forward inputs of a batch with or without references (docs/edit_ip.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hidream_ft.model.conditioning import ConditionProcessor, ImageConditions, VisionInputs, check_reference_count
from hidream_ft.model.errors import ModelInputError
from hidream_ft.model.layout import (
    EMPTY_PROMPT, LayoutBatch, PackedLayout, SampleLayout, SpecialTokens, chat_prompt_ids, collate_layouts,
    image_grid, layout_from_ids, pack_layouts,
)
from hidream_ft.model.patches import patchify


def reference_prompt_ids(tokenizer, tokens: SpecialTokens, caption: str, vit_token_counts: list[int]) -> list[int]:
    """Chat prompt with ``[image]×K`` before the caption; each image's `<|image_pad|>` expanded to its count."""
    content = [{"type": "image"}] * len(vit_token_counts) + [{"type": "text", "text": caption}]
    ids = chat_prompt_ids(tokenizer, tokens, content)
    pad_positions = [i for i, token in enumerate(ids) if token == tokens.image_pad]
    if len(pad_positions) != len(vit_token_counts):
        raise ValueError(f"the chat template rendered {len(pad_positions)} <|image_pad|> tokens for "
                         f"{len(vit_token_counts)} images; the caption must not contain image tokens")
    expanded, start = [], 0
    for position, count in zip(pad_positions, vit_token_counts):
        expanded += ids[start:position] + [tokens.image_pad] * count
        start = position + 1
    return expanded + ids[start:]


@dataclass
class ReferenceLayout:
    """One edit/IP sample: its sequence layout plus what fills the reference slots."""

    layout: SampleLayout
    reference_patches: torch.Tensor  # [Σ r_i, 3072] clean patches, references in order
    reference_grids: list[tuple[int, int]]  # (h, w) of each reference in 32-px patches
    vision: VisionInputs


def build_reference_layout(
    tokenizer,
    tokens: SpecialTokens,
    processor: ConditionProcessor,
    caption: str,
    height: int,
    width: int,
    references: list[torch.Tensor],
) -> ReferenceLayout:
    """The edit (K = 1) / IP (K ≥ 1) sequence for a ``width`` × ``height`` target and already-sized references.

    Text and ViT placeholders, boi, tms; then N_t target slots; then Σ r_i reference slots. Positions follow
    the fix-point rope index (ViT grids inline, target at 4096, references after it); token types are 0 for
    all text (ViT placeholders included), 3 for tms, 1 for the target and 2 for the references.
    """
    check_reference_count(len(references))
    grids = []
    for index, pixels in enumerate(references):
        if pixels.dim() != 3 or pixels.shape[0] != 3:
            raise ValueError(f"reference {index}: expected a [3, H, W] tensor, got shape {list(pixels.shape)}")
        try:
            grid = image_grid(pixels.shape[1], pixels.shape[2])
        except ValueError as e:
            raise ValueError(f"reference {index}: {e} (size references with prepare_references)") from None
        if grid == (1, 1):  # its placeholder run would be a lone vision-start, which the rope index cannot find
            raise ModelInputError(f"reference {index} is a single 32x32 patch; use a larger target so that every "
                             "reference gets at least 2 patches")
        grids.append(grid)
    vision = processor(references)
    ids = reference_prompt_ids(tokenizer, tokens, caption, vision.token_counts)
    layout = layout_from_ids(ids, tokens, target=image_grid(height, width), references=grids,
                             vit_grids=vision.merged_grids)
    patches = torch.cat([patchify(p[None])[0] for p in references])
    return ReferenceLayout(layout, patches, grids, vision)


def collate_reference_layouts(items: list[ReferenceLayout], pad_id: int) -> tuple[LayoutBatch, ImageConditions]:
    """Batch edit/IP samples; every sample must have the same target and reference sizes (one shape group)."""
    shapes = {(item.layout.num_target_tokens, tuple(item.reference_grids)) for item in items}
    if len(shapes) != 1:
        raise ValueError(f"a batch must share target and reference sizes; got {sorted(shapes)} "
                         "(the data pipeline groups samples by target and reference sizes)")
    layout = collate_layouts([item.layout for item in items], pad_id)
    conditions = ImageConditions(
        references=torch.stack([item.reference_patches for item in items]),
        pixel_values=torch.cat([item.vision.pixel_values for item in items]),
        image_grid_thw=torch.cat([item.vision.image_grid_thw for item in items]),
    )
    return layout, conditions


def pack_sample_layouts(items: list[SampleLayout | ReferenceLayout], pad_id: int,
                        length: int) -> tuple[PackedLayout, ImageConditions | None]:
    """One packed row of ``length`` tokens from text-to-image layouts and edit/IP layouts in any mix and sizes;
    the conditions hold the references and ViT inputs of the edit/IP samples in row order."""
    layout = pack_layouts([item.layout if isinstance(item, ReferenceLayout) else item for item in items], pad_id,
                          length)
    with_references = [item for item in items if isinstance(item, ReferenceLayout)]
    if not with_references:
        return layout, None
    return layout, ImageConditions(
        references=torch.cat([item.reference_patches for item in with_references]),
        pixel_values=torch.cat([item.vision.pixel_values for item in with_references]),
        image_grid_thw=torch.cat([item.vision.image_grid_thw for item in with_references]),
    )


def generation_inputs(layout: LayoutBatch | PackedLayout, noisy_target: torch.Tensor,
                      conditions: ImageConditions | None) -> dict:
    """Keyword arguments of ``HiDreamO1.forward`` (all but the timestep): vinputs = noisy target [+ references]
    (per sample, in row order, for a packed layout)."""
    inputs = layout.model_inputs()
    if conditions is None:
        return {**inputs, "vinputs": noisy_target}
    references = conditions.references.to(noisy_target.dtype)
    if isinstance(layout, PackedLayout):
        vinputs = layout.image_inputs(noisy_target, references)
    else:
        vinputs = torch.cat([noisy_target, references], dim=1)
    return {**inputs, "vinputs": vinputs, "pixel_values": conditions.pixel_values,
            "image_grid_thw": conditions.image_grid_thw}


def build_reference_inputs(
    tokenizer,
    tokens: SpecialTokens,
    processor: ConditionProcessor,
    prompt: str,
    references: list[torch.Tensor],
    height: int,
    width: int,
    guided: bool,
) -> tuple[LayoutBatch, ImageConditions]:
    """Sampling inputs: the conditional row and, when ``guided``, the unconditional row (caption " ", same
    images), batched so both share one forward on the same noisy target."""
    captions = [prompt, EMPTY_PROMPT] if guided else [prompt]
    items = [build_reference_layout(tokenizer, tokens, processor, c, height, width, references) for c in captions]
    return collate_reference_layouts(items, tokens.pad)
