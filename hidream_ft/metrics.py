"""Rank-0 logging: a progress bar, tensorboard scalars/images and, optionally, the same to wandb."""

from __future__ import annotations

import importlib.util
import logging
import resource
import secrets
import sys
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from hidream_ft.config import ConfigError, LoggingConfig

WANDB_RUN_ID_FILE = "wandb_run_id"  # in the output folder: a resumed run continues the same wandb curves


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


def require_wandb(cfg: LoggingConfig) -> None:
    """Fail before the model loads, not at the first logged step, when wandb is asked for but not installed."""
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb = true needs the wandb package: pip install wandb")


def start_wandb_run(output_dir: Path, cfg: LoggingConfig):
    """A wandb run whose id is kept in the output folder, so that a resumed training run appends to it."""
    import wandb  # only when enabled: wandb is an optional dependency

    id_file = output_dir / WANDB_RUN_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
    return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or output_dir.resolve().name, id=run_id,
                      resume="allow", mode=cfg.wandb_mode, dir=str(output_dir))


class MetricsLogger:
    """Does nothing on ranks other than 0, so call sites need no rank checks. Writes each scalar and image to
    tensorboard and wandb alike, where enabled."""

    def __init__(self, output_dir: Path, enabled: bool, cfg: LoggingConfig, total_steps: int, start_step: int):
        self.enabled = enabled
        self.writer = SummaryWriter(str(output_dir / "tensorboard")) if enabled and cfg.tensorboard else None
        self.wandb_run = start_wandb_run(output_dir, cfg) if enabled and cfg.wandb else None
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not enabled, dynamic_ncols=True,
                        file=sys.stderr, desc="train")
        self._handler = _AboveTheBar()
        logging.getLogger("hidream_ft").addHandler(self._handler)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def add_image(self, tag: str, image: torch.Tensor, global_step: int, dataformats: str = "CHW") -> None:
        """A uint8 image, with SummaryWriter's signature so that image writers take either."""
        if self.writer is not None:
            self.writer.add_image(tag, image, global_step=global_step, dataformats=dataformats)
        if self.wandb_run is not None:
            import wandb

            hwc = image.permute([dataformats.index(axis) for axis in "HWC"])
            self.wandb_run.log({tag: wandb.Image(hwc.numpy())}, step=global_step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

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
        if self.wandb_run is not None:
            self.wandb_run.finish()
