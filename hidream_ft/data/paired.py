"""Paired samples for edit and subject-driven (IP) training: a target image, its caption or instruction, and one
or more control (reference) images.

Folders (like other trainers' ``control_path`` / ``control_paths``): every control folder holds one image per
target with the same relative name, any image extension::

    edits/target/cat.jpg  edits/target/cat.txt      target and instruction
    edits/source/cat.png                            its control image

WebDataset shards: a sample's ``ref0.<ext>``, ``ref1.<ext>``, … members are its references, in index order.

Control images are never cropped to the target's aspect: each is resized by the official K rule
(:func:`hidream_ft.model.references.reference_pixel_size`, then ``resize_pilimage``), so its size follows
from its own header size, the target bucket and K. :func:`shape_key` names the resulting shapes; a micro-batch
only holds samples with one key.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path, PurePosixPath

import torch

from hidream_ft.data.folders import sample_key
from hidream_ft.data.images import IMAGE_EXTENSIONS
from hidream_ft.model.references import MAX_REFERENCES, reference_pixel_size, resized_size

TASKS = ("t2i", "edit", "ip")
_REFERENCE_MEMBER = re.compile(r"^ref(\d+)\.(\w+)$")


class MissingControl(ValueError):
    """A target has no control image in one of its control folders."""


def index_controls(control_dir: str | Path) -> dict[str, str]:
    """Sample key (relative path without extension, as for targets) → image path, for one control folder."""
    root = Path(control_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"control folder {control_dir!r} is not a directory")
    index = {}
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.rpartition(".")[2].lower() not in IMAGE_EXTENSIONS or "." not in name:
                continue
            path = Path(directory, name)
            index.setdefault(sample_key(PurePosixPath(path.relative_to(root).as_posix())), str(path))
    return index


def match_controls(key: str, indexes: list[dict[str, str]], control_dirs: list[str]) -> list[str]:
    """The control image of ``key`` in every control folder, in folder order; :class:`MissingControl` if one
    folder has none."""
    paths = []
    for index, folder in zip(indexes, control_dirs, strict=True):
        if key not in index:
            raise MissingControl(f"{key}: no control image in {folder}")
        paths.append(index[key])
    return paths


def reference_members(raw: dict) -> list[str]:
    """Member names of a WebDataset sample's references (``ref0.jpg``, ``ref1.png``, …), in index order.

    Raises ValueError when the indices are not 0, 1, …, K-1 or one index has two images."""
    found: dict[int, str] = {}
    for member in raw:
        match = _REFERENCE_MEMBER.match(member)
        if not match or match.group(2).lower() not in IMAGE_EXTENSIONS:
            continue
        index = int(match.group(1))
        if index in found:
            raise ValueError(f"two images for reference {index}: {found[index]} and {member}")
        found[index] = member
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"reference members must be numbered ref0, ref1, … without gaps; got {sorted(found.values())}")
    return [found[i] for i in range(len(found))]


def default_task(num_references: int) -> str:
    return "t2i" if num_references == 0 else "edit" if num_references == 1 else "ip"


def reference_sizes(control_sizes: list[tuple[int, int]], bucket: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """(width, height) of each reference for a ``bucket`` = (width, height) target, from the controls' header
    sizes alone (so samples can be grouped before any decoding)."""
    if len(control_sizes) > MAX_REFERENCES:
        raise ValueError(f"{len(control_sizes)} control images; at most {MAX_REFERENCES} are supported")
    if not control_sizes:
        return ()
    size = reference_pixel_size(len(control_sizes), bucket[1], bucket[0])
    return tuple(resized_size(w, h, size) for w, h in control_sizes)


def shape_key(sample) -> tuple:
    """Samples with equal keys can share a micro-batch: same target size and same reference sizes, in order."""
    return (tuple(sample.pixels.shape[1:]), tuple(tuple(ref.shape[1:]) for ref in sample.references))


def task_weight(task: str, weights: dict[str, float]) -> float:
    """Loss weight multiplier of a task (``data.task_weights``; tasks not listed weigh 1)."""
    return float(weights.get(task, 1.0))

