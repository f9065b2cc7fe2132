"""The base class of every error that is the user's to fix rather than a defect of this package, and how its
messages show long lists of names."""

from __future__ import annotations

from collections.abc import Iterable


class UserError(Exception):
    """Bad input or environment: a config, checkpoint, dataset, adapter or path the user gave cannot be used.

    Entry points print its message as one ``error: ...`` line and exit with status 2 (:mod:`hidream_ft.cli`),
    so the message must name what to fix; any other exception is a bug and keeps its traceback.
    """


def listing(items: Iterable[str], limit: int = 8) -> str:
    """``items`` sorted and comma-separated, cut after ``limit`` with a count of the rest."""
    items = sorted(items)
    more = f" … and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
