"""Rank-0 logging: a progress bar and tensorboard scalars/images."""

from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class _AboveTheBar(logging.Handler):
    """Prints the package's warnings (e.g. skipped data) on lines of their own above the progress bar. Data
    loader workers inherit it but not the bar, so on a terminal it also clears the line the bar is drawn on."""

    def emit(self, record: logging.LogRecord) -> None:
        clear = "\r\x1b[K" if sys.stderr.isatty() else ""
        tqdm.write(clear + self.format(record), file=sys.stderr)


class MetricsLogger:
    """Does nothing on ranks other than 0, so call sites need no rank checks."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.writer = SummaryWriter(str(output_dir / "tensorboard")) if enabled and tensorboard else None
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not enabled, dynamic_ncols=True,
                        file=sys.stderr, desc="train")
        self._handler = _AboveTheBar()
        logging.getLogger("hidream_ft").addHandler(self._handler)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def progress(self, step: int, loss: float, lr: float) -> None:
        if self.enabled:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            self.bar.update(step - self.bar.n)

    def info(self, message: str) -> None:
        """A line above the bar; after :meth:`close`, a plain line (so a closing message ends the output)."""
        if self.enabled:
            tqdm.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        logging.getLogger("hidream_ft").removeHandler(self._handler)
        if self.writer is not None:
            self.writer.close()
