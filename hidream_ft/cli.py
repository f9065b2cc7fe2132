"""The one wrapper around every command-line entry point: user errors as one line, bugs with a traceback."""

from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hidream_ft.errors import UserError

USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130  # 128 + SIGINT, what shells report for Ctrl-C

# Failures of the machine or of the user's permissions, whichever file they hit.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
# Failures that are the user's only when they concern a path given on the command line; on any other
# path they may be a bug (a file the program should have created), so they keep their traceback.
_GIVEN_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}


def _given_paths(argv: Sequence[str]) -> set[Path]:
    """Every argument, and every ``--flag=VALUE`` / ``KEY=VALUE`` value, as an absolute path."""
    paths = set()
    for arg in argv:
        for text in {arg, arg.partition("=")[2]} - {""}:
            paths.add(Path(os.path.abspath(text)))
    return paths


def _environment_problem(e: OSError, argv: Sequence[str]) -> str | None:
    """One line naming the path and the problem, for an OSError the user must fix; None for anything else."""
    filenames = [name for name in (e.filename, e.filename2) if isinstance(name, (str, bytes, os.PathLike))]
    if e.errno in _GIVEN_PATH_ERRNOS:
        given = _given_paths(argv)
        if not any(Path(os.path.abspath(os.fsdecode(name))) in given for name in filenames):
            return None
    elif e.errno not in _ENVIRONMENT_ERRNOS:
        return None
    problem = e.strerror or os.strerror(e.errno)
    # A write to an already open file reports no path, only the problem (e.g. a full disk).
    return f"{os.fsdecode(filenames[0])}: {problem}" if filenames else problem


def _close_progress_bars() -> None:
    """Close the progress bars an error left open, so that the error line is not written into a bar's line and
    no bar is redrawn below it when the process exits."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def run_main(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)`` (default: the process arguments) and turn its outcome into an exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv) or 0
    except UserError as e:
        message = str(e)
    except OSError as e:
        message = _environment_problem(e, argv)
        if message is None:
            raise
    except KeyboardInterrupt:
        _close_progress_bars()
        return INTERRUPTED_STATUS
    _close_progress_bars()
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return USER_ERROR_STATUS


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers ≥ ``minimum``."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not ≥ {minimum}")
        return value

    return parse


def image_size(text: str) -> tuple[int, int]:
    """An argparse ``type``: ``WxH`` → (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 1024x1024") from None
    return width, height


def entry_point(main: Callable[[list[str]], int | None]) -> Callable[[Sequence[str] | None], int]:
    """Decorate a command's ``main(argv)`` so that it runs under :func:`run_main` and returns an exit status.

    ``python -m`` and the console scripts call it without arguments; tests pass ``argv``."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        return run_main(main, argv)

    return wrapped
