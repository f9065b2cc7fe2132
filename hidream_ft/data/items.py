"""What the data indexes hold before anything is decoded: a folder image and the control images of a target."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Controls:
    """The control (reference) images of one edit / IP target, in reference order."""

    sources: tuple[str | bytes, ...]  # file paths (folders) or encoded images (shards)
    names: tuple[str, ...]  # for messages
    sizes: tuple[tuple[int, int], ...]  # (width, height) as displayed, from the headers
    task: str  # "edit" or "ip"


@dataclass(frozen=True)
class FolderItem:
    key: str
    path: str
    caption: str  # metadata caption or sidecar text, plus metadata tags; "" when missing (policy "empty")
    weight: float
    width: int  # as displayed (after EXIF orientation)
    height: int
    repeats: int
    controls: Controls | None = None  # edit / IP targets: their control images (hidream_ft.data.paired)
    mask: str | None = None  # loss mask file (the folder's ``mask_dir``); None: the whole image is learnt
