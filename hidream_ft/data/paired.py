"""Paired samples for edit and subject-driven (IP) training: a target, its caption or instruction, and its
control (reference) images from control folders or a shard sample's ``refN`` members (docs/edit_ip.md)."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from hidream_ft.config import ConfigError, DataConfig, FolderSource
from hidream_ft.data.buckets import Bucket, Stage
from hidream_ft.data.folders import images_by_key, resolved_folder, sample_key
from hidream_ft.data.images import IMAGE_EXTENSIONS, BadImage, ImageTooLarge, decode_rgb, probe_size
from hidream_ft.data.items import Controls, FolderItem
from hidream_ft.data.samples import Sample
from hidream_ft.data.stats import record
from hidream_ft.errors import UserError
from hidream_ft.model.conditioning import (
    MAX_REFERENCES, condition_token_count, reference_pixel_size, resize_pilimage, resized_size,
)
from hidream_ft.model.patches import PATCH_SIZE, pixels_from_image

_REFERENCE_MEMBER = re.compile(r"^ref(\d+)\.(\w+)$")


def default_task(num_references: int) -> str:
    return "edit" if num_references == 1 else "ip"


def task_weight(task: str, weights: dict[str, float]) -> float:
    """Loss weight multiplier of a task (``data.task_weights``; tasks not listed weigh 1)."""
    return float(weights.get(task, 1.0))


def reference_sizes(control_sizes: tuple[tuple[int, int], ...], bucket: Bucket) -> tuple[tuple[int, int], ...]:
    """(width, height) of each reference for a ``bucket`` = (width, height) target, from header sizes alone."""
    size = reference_pixel_size(len(control_sizes), bucket[1], bucket[0])
    return tuple(resized_size(w, h, size) for w, h in control_sizes)


def sample_tokens(bucket: Bucket, control_sizes: tuple[tuple[int, int], ...] | None, max_text_tokens: int) -> int:
    """Sequence length a sample can take at ``bucket``, from header sizes alone, for token-budget packing:
    the caption's bound ``max_text_tokens``, the target's patches and, with references, each reference's
    patches and ViT condition tokens (with its vision start and end)."""
    tokens = max_text_tokens + (bucket[0] // PATCH_SIZE) * (bucket[1] // PATCH_SIZE)
    for width, height in reference_sizes(control_sizes, bucket) if control_sizes else ():
        vit_tokens = condition_token_count(len(control_sizes), width, height) + 2
        tokens += (width // PATCH_SIZE) * (height // PATCH_SIZE) + vit_tokens
    return tokens


# -- folders -------------------------------------------------------------------------------------------------


@dataclass
class _PairedFolder:
    where: str
    root: Path
    control_dirs: list[Path]
    indexes: list[dict[str, str]]
    task: str


def _paired_folders(sources: list[FolderSource]) -> list[_PairedFolder]:
    folders = []
    for i, source in enumerate(sources):
        where = f"data.folders[{i}]"
        if not source.controls:
            continue
        if len(source.controls) > MAX_REFERENCES:
            raise ConfigError(f"{where}: {len(source.controls)} control folders; at most {MAX_REFERENCES} "
                              "references are supported")
        dirs = [resolved_folder(d, f"{where}.control_dirs[{j}]") for j, d in enumerate(source.controls)]
        folders.append(_PairedFolder(where, resolved_folder(source.path, f"{where}.path"), dirs,
                                     [images_by_key(d) for d in dirs], source.task or default_task(len(dirs))))
    # Nested data folders: an image belongs to the innermost folder that holds it.
    return sorted(folders, key=lambda f: len(f.root.parts), reverse=True)


def attach_controls(items: list[FolderItem], sources: list[FolderSource], missing_control: str,
                    counts: Counter) -> list[FolderItem]:
    """Give the items of folders with ``control_dir(s)`` their control images. A target without a control in
    one of its folders is left out and counted (``missing_control = "skip"``) or stops the run ("error")."""
    paired = _paired_folders(sources)
    if not paired:
        return items
    kept = []
    for item in items:
        path = Path(item.path)
        folder = next((f for f in paired if path.is_relative_to(f.root)), None)
        if folder is None:
            kept.append(item)
            continue
        key = sample_key(PurePosixPath(path.relative_to(folder.root).as_posix()))
        missing = [str(d) for d, index in zip(folder.control_dirs, folder.indexes) if key not in index]
        if missing:
            message = f"{item.path}: no control image named {key}.* in {missing[0]}"
            if missing_control == "error":
                raise ConfigError(f"{folder.where}: {message} (data.missing_control = 'error')")
            record(counts, "control_missing_skipped", message)
            continue
        paths = tuple(index[key] for index in folder.indexes)
        try:
            sizes = tuple(probe_size(p, p) for p in paths)
        except BadImage as e:
            record(counts, "corrupt_image", str(e))
            continue
        kept.append(dataclasses.replace(item, controls=Controls(paths, paths, sizes, folder.task)))
    if not kept:
        raise ConfigError("data.folders: no target image has all of its control images")
    return kept


@dataclass(frozen=True)
class ShapeGroups:
    """The folder plan's buckets split by reference shape: each stage's bucket list is extended by one entry
    per (bucket, reference sizes) group, and reference items are assigned to those entries."""

    stages: list[Stage]
    assignments: list[np.ndarray]
    plain_buckets: list[int]  # per stage: entries below this index are text-to-image buckets

    def interchangeable(self, stage: Stage, key: int) -> np.ndarray:
        """Items that may replace an undecodable item planned under ``key``: any text-to-image item for a
        text-to-image bucket (it is rendered at that bucket), only the same shape group otherwise."""
        assignment, plain = self.assignments[stage.index], self.plain_buckets[stage.index]
        if key >= plain:
            return np.flatnonzero(assignment == key)
        return np.flatnonzero((assignment >= 0) & (assignment < plain))


def group_by_shape(stages: list[Stage], assignments: list[np.ndarray], items: list[FolderItem]) -> ShapeGroups:
    paired = [index for index, item in enumerate(items) if item.controls is not None]
    extended_stages, keys = [], []
    for stage, assignment in zip(stages, assignments):
        buckets, groups, stage_keys = list(stage.buckets), {}, assignment.copy()
        for index in paired:
            if assignment[index] < 0:
                continue
            bucket = stage.buckets[assignment[index]]
            group = (int(assignment[index]), reference_sizes(items[index].controls.sizes, bucket))
            if group not in groups:
                groups[group] = len(buckets)
                buckets.append(bucket)
            stage_keys[index] = groups[group]
        extended_stages.append(dataclasses.replace(stage, buckets=tuple(buckets)))
        keys.append(stage_keys)
    return ShapeGroups(extended_stages, keys, [len(stage.buckets) for stage in stages])


# -- shards --------------------------------------------------------------------------------------------------


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
        raise ValueError(f"references must be numbered ref0, ref1, … without gaps; got {sorted(found.values())}")
    return [found[i] for i in range(len(found))]


class BadControls(UserError, ValueError):
    """A shard sample's references are unusable; ``reason`` is its data counter."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def shard_controls(raw: dict, meta: dict, name: str) -> Controls | None:
    """A shard sample's references (None: a text-to-image sample). Raises :class:`BadControls` for bad
    numbering, too many references or an unreadable header."""
    try:
        members = reference_members(raw)
    except ValueError as e:
        raise BadControls("metadata_invalid", f"{name}: {e}") from None
    if not members:
        return None
    if len(members) > MAX_REFERENCES:
        raise BadControls("too_many_references", f"{name}: {len(members)} references; at most {MAX_REFERENCES}")
    sources = tuple(raw[m] for m in members)
    names = tuple(f"{name}.{m}" for m in members)
    try:
        sizes = tuple(probe_size(source, n) for source, n in zip(sources, names))
    except BadImage as e:
        raise BadControls("corrupt_image", str(e)) from None
    task = meta.get("task") if meta.get("task") in ("edit", "ip") else default_task(len(members))
    return Controls(sources, names, sizes, task)


# -- loading -------------------------------------------------------------------------------------------------


def with_references(sample: Sample | None, controls: Controls | None, bucket: Bucket, cfg: DataConfig,
                    counts: Counter) -> Sample | None:
    """Complete a target ``sample``: its task, its task-weighted loss weight and its references, decoded and
    sized for ``bucket`` by the K rule. None when a control cannot be decoded (counted as ``corrupt_image``) or
    is larger than ``data.max_image_pixels`` (``too_large_skipped``), as for targets."""
    if sample is None:
        return None
    sample.task = "t2i" if controls is None else controls.task
    sample.weight *= task_weight(sample.task, cfg.task_weights)
    if controls is None:
        return sample
    size = reference_pixel_size(len(controls.sources), bucket[1], bucket[0])
    references = []
    for source, name in zip(controls.sources, controls.names):
        try:
            image = decode_rgb(source, counts, name, max_pixels=cfg.max_image_pixels)
        except ImageTooLarge as e:
            record(counts, "too_large_skipped", str(e))
            return None
        except BadImage as e:
            record(counts, "corrupt_image", str(e))
            return None
        references.append(pixels_from_image(resize_pilimage(image, size)))
    sample.references = references
    return sample
