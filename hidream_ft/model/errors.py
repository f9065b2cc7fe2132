"""The error for what a user hands the model that its input format cannot take."""

from __future__ import annotations

from hidream_ft.errors import UserError


class ModelInputError(UserError, ValueError):
    """A tokenizer without HiDream-O1's special tokens, or a prompt, image size or reference set outside the
    model's input format; the message names the value and its limit."""
