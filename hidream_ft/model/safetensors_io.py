"""The one way this package opens ``.safetensors`` files: a file that is not one (truncated, corrupt, another
format under the suffix) is the user's to replace, so it becomes a :class:`UserError` naming the file."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from hidream_ft.errors import UserError


class SafetensorsFileError(UserError, ValueError):
    """A file that should be in the safetensors format cannot be read as one."""


def _unreadable(path: str | os.PathLike, e: SafetensorError) -> SafetensorsFileError:
    return SafetensorsFileError(f"{Path(path)}: not a readable safetensors file ({e}); it may be truncated by an "
                                "interrupted download or copy: replace it")


def open_safetensors(path: str | os.PathLike):
    """``safe_open(path, "pt")`` on the CPU: a handle (also a context manager) that reads tensors lazily."""
    try:
        return safe_open(str(path), "pt", device="cpu")
    except SafetensorError as e:
        raise _unreadable(path, e) from None


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the file, on the CPU."""
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise _unreadable(path, e) from None
