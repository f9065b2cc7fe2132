"""Edit and IP conditioning inputs: reference sizing by the number K of references, and the ViT condition
images (docs/edit_ip.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from hidream_ft.model.errors import ModelInputError
from hidream_ft.model.patches import PATCH_SIZE, image_from_pixels, pixels_from_image

# The official pipeline's largest case is 8+ subjects plus a layout canvas; beyond 10 the reference patches
# shrink below a useful size (M/4) and the ViT prefix grows towards the 4096 position anchor.
MAX_REFERENCES = 10
KEEP_ASPECT_SIZE = 2048  # the official keep_original_aspect target area side (K = 1)


def check_reference_count(num_references: int) -> None:
    if not 1 <= num_references <= MAX_REFERENCES:
        raise ModelInputError(f"{num_references} reference images given; edit/IP layouts take 1 to {MAX_REFERENCES}")


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


def condition_token_count(num_references: int, width: int, height: int) -> int:
    """LLM tokens of the ViT condition image of one of ``num_references`` references of ``width`` × ``height``:
    one per 32×32 pixels (ViT patch 16, 2×2 merge) of its condition size, whose sides are multiples of 32 that
    the image processor keeps."""
    w, h = condition_dimensions(condition_base_size(num_references), width, height)
    return (w // PATCH_SIZE) * (h // PATCH_SIZE)


def prepare_references(images: list[Image.Image], height: int, width: int) -> list[torch.Tensor]:
    """Reference images sized for a ``width`` × ``height`` target by the official K rule, as [-1, 1] tensors."""
    size = reference_pixel_size(len(images), height, width)
    return [pixels_from_image(resize_pilimage(image.convert("RGB"), size)) for image in images]


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
            image = image_from_pixels(pixels)
            images.append(image.resize(condition_dimensions(base, image.width, image.height),
                                       Image.Resampling.LANCZOS))
        out = self.image_processor(images=images, return_tensors="pt")
        return VisionInputs(out["pixel_values"], out["image_grid_thw"].long(), self.merge_size)


@dataclass
class ImageConditions:
    """The reference part of a batch: clean patches appended after the target, and the ViT inputs."""

    references: torch.Tensor  # [B, R, 3072]; [Σ R, 3072] in row order for packed rows
    pixel_values: torch.Tensor  # all samples' ViT patches, sample by sample
    image_grid_thw: torch.Tensor  # [Σ K, 3]

    def to(self, device: torch.device | str) -> "ImageConditions":
        return ImageConditions(*(t.to(device, non_blocking=True)
                                 for t in (self.references, self.pixel_values, self.image_grid_thw)))
