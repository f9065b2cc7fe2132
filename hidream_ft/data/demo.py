"""A tiny procedurally drawn dataset (coloured shapes with captions) for the CPU demo and tests."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
_BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "grey": (128, 128, 128)}
_SHAPES = ("circle", "square", "triangle", "horizontal stripes", "ring", "cross", "diamond", "vertical gradient")


def _draw(shape: str, colour: tuple, background: tuple, size: tuple[int, int]) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = width * 0.2, height * 0.2, width * 0.8, height * 0.8
    mid_x, mid_y = width / 2, height / 2
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=colour)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=colour)
    elif shape == "triangle":
        draw.polygon([(mid_x, top), (right, bottom), (left, bottom)], fill=colour)
    elif shape == "horizontal stripes":
        stripe = max(1, height // 8)
        for y in range(0, height, 2 * stripe):
            draw.rectangle((0, y, width, y + stripe - 1), fill=colour)
    elif shape == "ring":
        thickness = max(2, min(width, height) // 10)
        draw.ellipse((left, top, right, bottom), outline=colour, width=thickness)
    elif shape == "cross":
        bar_w, bar_h = max(2, width // 8), max(2, height // 8)
        draw.rectangle((mid_x - bar_w, top, mid_x + bar_w, bottom), fill=colour)
        draw.rectangle((left, mid_y - bar_h, right, mid_y + bar_h), fill=colour)
    elif shape == "diamond":
        draw.polygon([(mid_x, top), (right, mid_y), (mid_x, bottom), (left, mid_y)], fill=colour)
    else:  # vertical gradient from the background colour to the shape colour
        for y in range(height):
            t = y / max(1, height - 1)
            row = tuple(round(b + (c - b) * t) for b, c in zip(background, colour))
            draw.line((0, y, width, y), fill=row)
    return image


def write_demo_dataset(out_dir: str | Path, n: int = 8, size: tuple[int, int] = (64, 64)) -> Path:
    """Write ``n`` distinct images ``demo_000.png``… with ``.txt`` captions into ``out_dir``; deterministic.
    ``size`` is (width, height). Returns the folder, ready for ``data.folders``."""
    colours, backgrounds = list(_COLOURS.items()), list(_BACKGROUNDS.items())
    # Shape and colour both change from one image to the next; 8 shapes × 6 colours repeat after 24 images,
    # then the background changes.
    distinct = math.lcm(len(_SHAPES), len(colours)) * len(backgrounds)
    if not 1 <= n <= distinct:
        raise ValueError(f"write_demo_dataset: n must be between 1 and {distinct}, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for index in range(n):
        shape = _SHAPES[index % len(_SHAPES)]
        colour_name, colour = colours[index % len(colours)]
        background_name, background = backgrounds[index // math.lcm(len(_SHAPES), len(colours))]
        name = f"demo_{index:03d}"
        _draw(shape, colour, background, size).save(out / f"{name}.png")
        article = "an" if colour_name[0] in "aeiou" else "a"
        caption = f"{article} {colour_name} {shape} on a {background_name} background\n"
        (out / f"{name}.txt").write_text(caption, encoding="utf-8")
    return out
