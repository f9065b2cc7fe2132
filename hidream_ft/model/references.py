"""Edit and subject-driven (IP) conditioning: reference sizing, ViT condition inputs and the sequence layout.

A reference image enters the sequence twice (spec §3, §6):

* as **ViT condition tokens** inside the chat prompt. The user turn is ``[image]×K`` then the caption; each
  image becomes ``<|vision_start|> <|image_pad|>×n_i <|vision_end|>``, where n_i is the Qwen-VL image
  processor's grid at the condition size (384 px for K ≤ 4, 288 for K ≤ 8, else 192) divided by merge².
  These tokens are plain causal text for the decoder, and DeepStack adds ViT features at them.
* as **clean 32×32 patch tokens** after the noisy target, at a pixel size that shrinks with K
  (:func:`reference_pixel_size`, then :func:`resize_pilimage`).

Only the target tokens are predicted and supervised; the reference patches are inputs.

    processor = ConditionProcessor.from_pretrained(model_dir)
    refs = prepare_references([Image.open("dog.jpg")], height=1024, width=1024)
    item = build_reference_layout(tokenizer, tokens, processor, "make it a watercolor", 1024, 1024, refs)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hidream_ft.model.patches import PATCH_SIZE, patchify
from hidream_ft.model.layout import (
    EMPTY_PROMPT, LayoutBatch, SampleLayout, SpecialTokens, chat_prompt_ids, collate_layouts, image_grid,
    layout_from_ids,
)

# The official pipeline's largest case is 8+ subjects plus a layout canvas; beyond 10 the reference patches
# shrink below a useful size (M/4) and the ViT prefix grows towards the 4096 position anchor.
MAX_REFERENCES = 10
KEEP_ASPECT_SIZE = 2048  # the official keep_original_aspect target area side (K = 1)


def check_reference_count(num_references: int) -> None:
    if not 1 <= num_references <= MAX_REFERENCES:
        raise ValueError(f"{num_references} reference images given; edit/IP layouts take 1 to {MAX_REFERENCES}")


def reference_pixel_size(num_references: int, height: int, width: int) -> int:
    """Side S of the square area (S²) each reference patch image gets, from K and M = max(H, W) of the target."""
    check_reference_count(num_references)
    longest = max(height, width)
    if num_references == 1:
        return longest
    if num_references == 2:
        return longest * 48 // 64
    if num_references <= 4:
        return longest // 2
    if num_references <= 8:
        return longest * 24 // 64
    return longest // 4


def condition_base_size(num_references: int) -> int:
    """Side of the square area of each ViT condition image: fewer pixels per image as K grows."""
    check_reference_count(num_references)
    if num_references <= 4:
        return 384
    if num_references <= 8:
        return 288
    return 192


def fitted_size(width: int, height: int, size: int, multiple: int) -> tuple[int, int]:
    """Largest (w, h), both multiples of ``multiple``, with the image's aspect and area at most ``size``².

    Four candidates (round or floor of each scaled side, then floored to the multiple); the largest area that
    fits wins. A side never drops below one ``multiple`` (extreme aspects would otherwise give an empty image).
    """
    scale = math.sqrt(size * size / (width * height))
    candidates = []
    for scaled_w in (round(width * scale), math.floor(width * scale)):
        for scaled_h in (round(height * scale), math.floor(height * scale)):
            w = max(multiple, scaled_w // multiple * multiple)
            h = max(multiple, scaled_h // multiple * multiple)
            candidates.append((w * h <= size * size, w * h, w, h))
    fits = [c for c in candidates if c[0]] or candidates
    _, _, w, h = max(fits, key=lambda c: c[1])
    return w, h


def resized_size(width: int, height: int, size: int, multiple: int = PATCH_SIZE) -> tuple[int, int]:
    """(w, h) that :func:`resize_pilimage` gives a ``width`` × ``height`` image, from its header size alone."""
    while min(width, height) >= 2 * size:
        width, height = width // 2, height // 2
    return fitted_size(width, height, size, multiple)


def resize_pilimage(image: Image.Image, size: int, multiple: int = PATCH_SIZE) -> Image.Image:
    """The official reference resize: area ≤ ``size``², both sides multiples of ``multiple``, aspect kept by a
    centre crop of the overshooting side (bicubic; box-halved first while the short side is ≥ 2·size)."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX)
    target_w, target_h = fitted_size(image.width, image.height, size, multiple)
    scale = max(target_w / image.width, target_h / image.height)
    resized_w = max(target_w, round(image.width * scale))
    resized_h = max(target_h, round(image.height * scale))
    image = image.resize((resized_w, resized_h), Image.Resampling.BICUBIC)
    left, top = (resized_w - target_w) // 2, (resized_h - target_h) // 2
    return image.crop((left, top, left + target_w, top + target_h))


def condition_dimensions(base: int, width: int, height: int) -> tuple[int, int]:
    """(w, h) of a ViT condition image: area ≈ base², the reference's aspect, sides floored to multiples of 32."""
    ratio = width / height
    w = math.sqrt(base * base * ratio)
    h = w / ratio
    return max(PATCH_SIZE, int(w) // PATCH_SIZE * PATCH_SIZE), max(PATCH_SIZE, int(h) // PATCH_SIZE * PATCH_SIZE)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image → float32 [3, H, W] in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    return pixels.to(torch.float32).div_(127.5).sub_(1.0)


def to_image(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] → RGB image (exact inverse of :func:`to_tensor` on 8-bit data)."""
    array = pixels.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy(), "RGB")


def prepare_references(images: list[Image.Image], height: int, width: int) -> list[torch.Tensor]:
    """Reference images sized for a ``width`` × ``height`` target by the official K rule, as [-1, 1] tensors."""
    size = reference_pixel_size(len(images), height, width)
    return [to_tensor(resize_pilimage(image.convert("RGB"), size)) for image in images]


def keep_aspect_target_size(reference: Image.Image, size: int = KEEP_ASPECT_SIZE) -> tuple[int, int]:
    """(width, height) of an edit target that takes its single reference's size (official keep_original_aspect)."""
    return resized_size(reference.width, reference.height, size)


@dataclass
class VisionInputs:
    """One sample's ViT condition images, ready for ``HiDreamO1.forward``."""

    pixel_values: torch.Tensor  # [Σ t·h·w, C·T·P·P] processor patches, images in order
    image_grid_thw: torch.Tensor  # [K, 3] in ViT patch units
    merge_size: int

    @property
    def merged_grids(self) -> list[tuple[int, int]]:
        """Per image, the (h, w) grid of its LLM tokens (one token per merge×merge ViT patches)."""
        m = self.merge_size
        return [(h // m, w // m) for _, h, w in self.image_grid_thw.tolist()]

    @property
    def token_counts(self) -> list[int]:
        m = self.merge_size
        return [t * h * w // (m * m) for t, h, w in self.image_grid_thw.tolist()]


class ConditionProcessor:
    """Reference tensors → ViT condition inputs at the official condition size, through the checkpoint's own
    Qwen-VL image processor (``preprocessor_config.json``), so the placeholder counts always match the ViT."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ConditionProcessor":
        from transformers import AutoImageProcessor

        config = Path(path) / "preprocessor_config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{config} is missing; edit/IP training needs the checkpoint's image processor")
        return cls(AutoImageProcessor.from_pretrained(str(path)))

    @property
    def merge_size(self) -> int:
        return int(self.image_processor.merge_size)

    def __call__(self, references: list[torch.Tensor]) -> VisionInputs:
        base = condition_base_size(len(references))
        images = []
        for pixels in references:
            image = to_image(pixels)
            images.append(image.resize(condition_dimensions(base, image.width, image.height),
                                       Image.Resampling.LANCZOS))
        out = self.image_processor(images=images, return_tensors="pt")
        return VisionInputs(out["pixel_values"], out["image_grid_thw"].long(), self.merge_size)


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
            raise ValueError(f"reference {index} is a single 32x32 patch; use a larger target so that every "
                             "reference gets at least 2 patches")
        grids.append(grid)
    vision = processor(references)
    ids = reference_prompt_ids(tokenizer, tokens, caption, vision.token_counts)
    layout = layout_from_ids(ids, tokens, target=image_grid(height, width), references=grids,
                             vit_grids=vision.merged_grids)
    patches = torch.cat([patchify(p[None])[0] for p in references])
    return ReferenceLayout(layout, patches, grids, vision)


@dataclass
class ImageConditions:
    """The reference part of a batch: clean patches appended after the target, and the ViT inputs."""

    references: torch.Tensor  # [B, R, 3072]
    pixel_values: torch.Tensor  # all samples' ViT patches, sample by sample
    image_grid_thw: torch.Tensor  # [Σ K, 3]

    def to(self, device: torch.device | str) -> "ImageConditions":
        return ImageConditions(*(t.to(device, non_blocking=True)
                                 for t in (self.references, self.pixel_values, self.image_grid_thw)))


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


def generation_inputs(layout: LayoutBatch, noisy_target: torch.Tensor, conditions: ImageConditions | None) -> dict:
    """Keyword arguments of ``HiDreamO1.forward`` (all but the timestep): vinputs = noisy target [+ references]."""
    inputs = layout.model_inputs()
    if conditions is None:
        return {**inputs, "vinputs": noisy_target}
    references = conditions.references.to(noisy_target.dtype)
    return {**inputs, "vinputs": torch.cat([noisy_target, references], dim=1),
            "pixel_values": conditions.pixel_values, "image_grid_thw": conditions.image_grid_thw}


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


@dataclass
class ReferenceImages:
    """The reference images of one edit / IP generation, with the checkpoint's ViT image processor."""

    images: list[Image.Image]
    processor: ConditionProcessor

    def __post_init__(self) -> None:
        check_reference_count(len(self.images))

    @classmethod
    def open(cls, paths: list[str], model_path: str | Path) -> "ReferenceImages":
        """Read image files (OSError naming a missing or undecodable one) with ``model_path``'s processor."""
        check_reference_count(len(paths))
        images = []
        for path in paths:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        return cls(images, ConditionProcessor.from_pretrained(model_path))

    def model_inputs(self, tokenizer, tokens: SpecialTokens, prompt: str, height: int, width: int,
                     guided: bool) -> tuple[LayoutBatch, ImageConditions]:
        """Conditional [and unconditional] rows for a ``width`` × ``height`` target, references sized by K."""
        references = prepare_references(self.images, height, width)
        return build_reference_inputs(tokenizer, tokens, self.processor, prompt, references, height, width, guided)

