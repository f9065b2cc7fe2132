"""Reference images of an edit / IP generation, read from files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from hidream_ft.model.conditioning import ConditionProcessor, ImageConditions, check_reference_count, prepare_references
from hidream_ft.model.layout import LayoutBatch, SpecialTokens
from hidream_ft.model.reference_layout import build_reference_inputs


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
