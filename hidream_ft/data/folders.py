"""Index of local image folders: images, captions (``.txt`` sidecars or ``metadata.jsonl``), sizes, repeats.
Only headers and captions are read (docs/data.md: indexing cost, and when to pack into shards instead)."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path, PurePosixPath

from hidream_ft.config import ConfigError, FolderSource
from hidream_ft.data.captions import decode_caption
from hidream_ft.data.images import IMAGE_EXTENSIONS, BadImage, probe_size
from hidream_ft.data.items import FolderItem
from hidream_ft.data.stats import record

METADATA_FILE = "metadata.jsonl"


def sample_key(relative: PurePosixPath) -> str:
    """Relative path without the image extension. Dots in the file name become '_' because WebDataset
    splits a tar member name at its first dot into key and extension."""
    return str(relative.with_name(relative.stem.replace(".", "_")))


def _is_image(name: str) -> bool:
    return name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS and "." in name


def walk_folder(root: Path) -> tuple[list[Path], list[Path]]:
    """Image files and metadata files under ``root``, in a stable order; hidden entries (like macOS '._x.jpg'
    resource forks or .ipynb_checkpoints copies) are ignored."""
    images, metadata = [], []
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            if name == METADATA_FILE:
                metadata.append(Path(directory, name))
            elif _is_image(name):
                images.append(Path(directory, name))
    return images, metadata


def images_by_key(folder: Path) -> dict[str, str]:
    """Sample key (relative path without extension, as for targets) → image path, for a folder of companion
    images (controls, masks) named like the targets."""
    index = {}
    for path in walk_folder(folder)[0]:
        index.setdefault(sample_key(PurePosixPath(path.relative_to(folder).as_posix())), str(path))
    return index


def _read_metadata(files: list[Path], counts: Counter) -> dict[Path, dict]:
    """``metadata.jsonl`` entries keyed by the image path they name (``file_name`` is relative to the
    metadata file's folder)."""
    entries = {}
    for file in files:
        for number, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                name = entry["file_name"]
                weight = float(entry.get("weight", 1.0))
                tags = entry.get("tags", [])
                valid = isinstance(name, str) and weight >= 0 and isinstance(tags, list)
            except (ValueError, KeyError, TypeError):
                valid = False
            if not valid:
                record(counts, "metadata_invalid", f"{file}:{number}: expected a JSON object with 'file_name'")
                continue
            entries[Path(os.path.normpath(file.parent / name))] = entry
    return entries


def _caption(image: Path, entry: dict, counts: Counter) -> str | None:
    """The metadata caption (``caption`` or ``text``), else the sidecar ``.txt``, then the metadata tags;
    None when all are missing or blank."""
    caption = entry.get("caption", entry.get("text"))
    if not isinstance(caption, str):
        sidecar = image.with_suffix(".txt")
        caption = decode_caption(sidecar.read_bytes(), counts, str(sidecar)) if sidecar.is_file() else ""
    tags = [str(tag).strip() for tag in entry.get("tags", [])]
    parts = [part for part in [caption.strip(), *tags] if part]
    return ", ".join(parts) if parts else None


def resolved_folder(path: str, where: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{where}: {path!r} is not a directory")
    return folder.resolve()


def scan_folder(
    root: Path, num_repeats: int, missing_caption: str, counts: Counter, key_base: Path | None = None,
    seen_keys: dict | None = None, masks: dict[str, str] | None = None,
) -> list[FolderItem]:
    """Items of the folder ``root``; keys are paths relative to ``key_base`` (default: ``root``) and must be
    unique within ``seen_keys`` (shared between the folders of one dataset). ``masks``: the folder's loss
    masks by key relative to ``root`` (:func:`images_by_key`); an image without one is learnt whole."""
    key_base = key_base or root
    seen_keys = {} if seen_keys is None else seen_keys
    images, metadata_files = walk_folder(root)
    metadata = _read_metadata(metadata_files, counts)
    items, matched = [], set()
    for image in images:
        key = sample_key(PurePosixPath(image.relative_to(key_base).as_posix()))
        if key in seen_keys:
            record(counts, "duplicate_key_skipped", f"{image}: same name as {seen_keys[key]}; keeping the first")
            continue
        seen_keys[key] = image
        entry = metadata.get(Path(os.path.normpath(image)), {})
        if entry:
            matched.add(Path(os.path.normpath(image)))
        try:
            width, height = probe_size(str(image), str(image))
        except BadImage as e:
            record(counts, "corrupt_image", str(e))
            continue
        caption = _caption(image, entry, counts)
        if caption is None:
            if missing_caption == "skip":
                record(counts, "caption_missing_skipped", f"{image}: no caption (missing_caption = 'skip')")
                continue
            record(counts, "caption_missing_empty", f"{image}: no caption, training it with the empty prompt")
        weight = float(entry.get("weight", 1.0))
        mask = (masks or {}).get(sample_key(PurePosixPath(image.relative_to(root).as_posix())))
        if mask is not None and not _mask_fits(mask, width, height, counts):
            continue
        items.append(FolderItem(key, str(image), caption or "", weight, width, height, num_repeats, mask=mask))
    for path in sorted(set(metadata) - matched):
        record(counts, "metadata_unmatched", f"{path}: named in {METADATA_FILE} but not an image found here")
    return items


def _mask_fits(mask: str, width: int, height: int, counts: Counter) -> bool:
    """A mask must have its image's displayed size, so that the image's crop box cuts the same region of it;
    an unreadable or mis-sized mask leaves its image out, counted like a bad image."""
    try:
        size = probe_size(mask, mask)
    except BadImage as e:
        record(counts, "corrupt_image", str(e))
        return False
    if size != (width, height):
        record(counts, "corrupt_image", f"{mask}: mask is {size[0]}x{size[1]}, its image {width}x{height}")
        return False
    return True


def _mask_index(mask_dir: str, root: Path, where: str) -> dict[str, str]:
    folder = resolved_folder(mask_dir, where)
    if folder.is_relative_to(root):  # its masks would be indexed as training images of the folder
        raise ConfigError(f"{where}: {mask_dir!r} is inside the image folder {str(root)!r}; move the masks out")
    return images_by_key(folder)


def scan_folders(sources: list[FolderSource], missing_caption: str, counts: Counter,
                 where: str = "data.folders") -> list[FolderItem]:
    """All folders' items. Keys are relative to the folders' common parent ('cats/001' and 'dogs/001' for
    folders .../cats and .../dogs; just '001' for a single folder), so they are unique across folders.
    ``where``: the configuration key of ``sources``, for messages."""
    roots = [resolved_folder(source.path, f"{where}[{i}].path") for i, source in enumerate(sources)]
    masks = [_mask_index(source.mask_dir, root, f"{where}[{i}].mask_dir") if source.mask_dir else None
             for i, (source, root) in enumerate(zip(sources, roots))]
    duplicates = [str(root) for root in roots if roots.count(root) > 1]
    if duplicates:
        raise ConfigError(f"{where}: {duplicates[0]} is listed twice; use num_repeats to repeat a folder")
    key_base = Path(os.path.commonpath(roots)) if len(roots) > 1 else roots[0]
    seen_keys: dict = {}
    items = [
        item
        for root, source, folder_masks in zip(roots, sources, masks)
        for item in scan_folder(root, source.num_repeats, missing_caption, counts, key_base, seen_keys, folder_masks)
    ]
    if not items:
        folders = ", ".join(source.path for source in sources)
        raise ConfigError(f"{where}: no usable image (.{', .'.join(IMAGE_EXTENSIONS)}) found in {folders}")
    return items


def fingerprint(items: list[FolderItem]) -> str:
    """Identifies the indexed data; a saved data position is only meaningful for the same fingerprint."""
    digest = hashlib.blake2b(digest_size=12)
    for item in items:
        controls = "" if item.controls is None else "\0" + "\0".join(item.controls.sources)
        digest.update(f"{item.key}\0{item.width}\0{item.height}\0{item.repeats}{controls}\n".encode())
    return digest.hexdigest()
