"""The one error type of the converters, and how long key lists are shown in its messages."""

from __future__ import annotations

from collections.abc import Iterable


class ConvertError(ValueError):
    """An adapter or checkpoint cannot be read, converted or applied as asked."""


def listing(items: Iterable[str], limit: int = 8) -> str:
    items = sorted(items)
    more = f" … and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
