"""Comparison grids: rows = prompts (or reference × prompt for edit / IP), columns = model configurations
(base, LoRA A, LoRA A+B, …), every cell with the same settings and seed, as one labelled PNG."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from tqdm.auto import tqdm

from hidream_ft.lora import LoraAdapter, lora_applied
from hidream_ft.inference.pipeline import generate
from hidream_ft.config.sampling import SamplingSettings
from hidream_ft.model.layout import SpecialTokens
from hidream_ft.inference.references import ReferenceImages

BACKGROUND, INK = (255, 255, 255), (0, 0, 0)


@dataclass
class GridColumn:
    label: str
    loras: list[tuple[LoraAdapter, float]] = field(default_factory=list)


@dataclass(frozen=True)
class GridGeometry:
    """Pixel layout of a grid: a left label band, a header band, then rows × columns cells of one size."""

    rows: int
    columns: int
    cell_width: int
    cell_height: int

    @property
    def font_size(self) -> int:
        return max(10, min(self.cell_width, self.cell_height) // 24)

    @property
    def label_width(self) -> int:
        return max(120, self.cell_width // 2)

    @property
    def header_height(self) -> int:
        return 3 * self.font_size + 8  # room for two lines of column label

    @property
    def size(self) -> tuple[int, int]:
        return (self.label_width + self.columns * self.cell_width,
                self.header_height + self.rows * self.cell_height)

    def cell_origin(self, row: int, column: int) -> tuple[int, int]:
        return self.label_width + column * self.cell_width, self.header_height + row * self.cell_height


def wrap_text(text: str, fits, max_lines: int) -> list[str]:
    """Greedy word wrap; ``fits(line)`` says whether a line is narrow enough. Overflow ends in '...'."""
    lines: list[str] = []
    for word in text.split():
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] = f"{lines[-1]} {word}"
            continue
        while len(word) > 1 and not fits(word):  # an over-long word is cut, not dropped
            cut = max(i for i in range(1, len(word)) if i == 1 or fits(word[:i]))
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and not fits(lines[-1] + "..."):
            lines[-1] = lines[-1][:-1]
        lines[-1] += "..."
    return lines


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _draw_label(draw: ImageDraw.ImageDraw, text: str, box: tuple[int, int, int, int], font, size: int) -> None:
    left, top, right, bottom = box
    pad = max(2, size // 3)
    line_height = size + max(2, size // 5)
    max_lines = max(1, (bottom - top - 2 * pad) // line_height)
    fits = lambda line: draw.textlength(line, font=font) <= right - left - 2 * pad  # noqa: E731
    for i, line in enumerate(wrap_text(text, fits, max_lines)):
        draw.text((left + pad, top + pad + i * line_height), line, fill=INK, font=font)


def compose_grid(cells: Sequence[Sequence[torch.Tensor]], row_labels: Sequence[str],
                 column_labels: Sequence[str]) -> Image.Image:
    """Lay out uint8 [3, H, W] images (``cells[row][column]``, all one size) with text labels."""
    if not cells or not cells[0]:
        raise ValueError("a grid needs at least one row and one column")
    if len(row_labels) != len(cells) or any(len(row) != len(column_labels) for row in cells):
        raise ValueError("the labels do not match the grid's rows and columns")
    _, height, width = cells[0][0].shape
    geometry = GridGeometry(len(cells), len(column_labels), width, height)
    canvas = Image.new("RGB", geometry.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(geometry.font_size)
    for column, label in enumerate(column_labels):
        x, _ = geometry.cell_origin(0, column)
        _draw_label(draw, label, (x, 0, x + width, geometry.header_height), font, geometry.font_size)
    for row, (label, images) in enumerate(zip(row_labels, cells)):
        _, y = geometry.cell_origin(row, 0)
        _draw_label(draw, label, (0, y, geometry.label_width, y + height), font, geometry.font_size)
        for column, image in enumerate(images):
            if tuple(image.shape) != (3, height, width):
                raise ValueError(f"grid cell ({row}, {column}) is {list(image.shape)}, expected {[3, height, width]}")
            canvas.paste(to_pil(image), geometry.cell_origin(row, column))
    return canvas


def to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 [3, H, W] → PIL RGB."""
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


@dataclass
class GridRow:
    """One grid row: its label, its prompt and, for edit / IP, its reference images."""

    label: str
    prompt: str
    references: ReferenceImages | None = None


def grid_rows(prompts: Sequence[str], references: Sequence[tuple[str, ReferenceImages]] = ()) -> list[GridRow]:
    """The prompts or, with ``references`` ((label, images) pairs), every (reference, prompt) pair,
    reference-major."""
    if not references:
        return [GridRow(prompt, prompt) for prompt in prompts]
    return [GridRow(f"{label}: {prompt}", prompt, images) for label, images in references for prompt in prompts]


def sample_cells(
    model: nn.Module,
    tokenizer,
    tokens: SpecialTokens,
    rows: Sequence[GridRow],
    columns: Sequence[GridColumn],
    settings: SamplingSettings,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> list[list[torch.Tensor]]:
    """Sample every (row, column) cell: ``cells[row][column]``, uint8 [3, H, W]."""
    cells: list[list[torch.Tensor]] = [[] for _ in rows]
    with tqdm(total=len(rows) * len(columns), disable=not progress, desc="grid") as bar:
        for column in columns:  # column-major: each column's adapters are attached once
            with lora_applied(model, column.loras):
                for row, spec in enumerate(rows):
                    cells[row].append(generate(model, tokenizer, tokens, spec.prompt, settings, device,
                                               references=spec.references))
                    bar.update()
    return cells


def render_grid(
    model: nn.Module,
    tokenizer,
    tokens: SpecialTokens,
    prompts: Sequence[str],
    columns: Sequence[GridColumn],
    settings: SamplingSettings,
    device: torch.device | str | None = None,
    progress: bool = False,
    references: Sequence[tuple[str, ReferenceImages]] = (),
) -> Image.Image:
    """Sample every (row, column) cell and compose the labelled grid; rows as in :func:`grid_rows`."""
    rows = grid_rows(prompts, references)
    cells = sample_cells(model, tokenizer, tokens, rows, columns, settings, device, progress)
    return compose_grid(cells, [row.label for row in rows], [column.label for column in columns])
