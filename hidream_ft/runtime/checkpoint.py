"""Sharded, atomic, reshardable checkpoints with torch.distributed.checkpoint (DCP); the folder layout and
the commit protocol are in docs/architecture.md."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_state_dict, set_state_dict,
)

from hidream_ft.config import ConfigError
from hidream_ft.errors import UserError, listing
from hidream_ft.model.loading import LM_HEAD
from hidream_ft.model.safetensors_io import open_safetensors
from hidream_ft.runtime.lock import OutputLock

MARKER = "COMPLETE"
PREFIX = "step-"
# The checkpoint part that holds an EMA's state ({"weights": {name: average}, "updates": count}), and its weights.
EMA_PART = "ema"
EMA_WEIGHTS = "ema.weights"


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoint folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(PREFIX) and (path / MARKER).is_file():
            try:
                found.append((int(path.name[len(PREFIX):]), path))
            except ValueError:
                continue
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str, root: Path) -> Path | None:
    """``auto``: the newest complete checkpoint (or none); ``none``: start fresh; else a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise ConfigError(f"checkpoint.resume = {resume!r}: not a complete checkpoint (no {MARKER} marker); "
                          "use 'auto', 'none' or a step-N folder")
    return path


def _rank_file(step_dir: Path, rank: int) -> Path:
    return step_dir / f"rank-{rank:05d}.safetensors"


def _plain(value: Any) -> Any:
    """``json.dumps``'s fallback for the numpy scalars a data position may hold."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} in the data state is not JSON-serialisable")


def _save_rank_state(path: Path, data_state: Any) -> None:
    """This rank's global RNG streams (LoRA dropout; diffusion noise is seeded per sample) and data position,
    as tensors and JSON: a format that, unlike a pickle, cannot run code when it is loaded."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(path), metadata={"data": json.dumps(data_state, default=_plain)})


def _load_rank_state(step_dir: Path, rank: int) -> tuple[dict[str, torch.Tensor], Any]:
    """(RNG tensors, data state) of ``rank``. Checkpoints of earlier versions kept them in ``rank-N.pt``
    pickles, which are read only through torch's tensors-and-containers unpickler."""
    path = _rank_file(step_dir, rank)
    if path.is_file():
        with open_safetensors(path) as f:
            data = json.loads(f.metadata()["data"])
            return {key: f.get_tensor(key) for key in f.keys()}, data
    legacy = path.with_suffix(".pt")
    try:
        state = torch.load(legacy, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointReadError(f"{legacy}: holds more than tensors and plain containers, so it is not loaded "
                                  "(a pickle can run code); start from the checkpoint's weights with "
                                  "checkpoint.resume = 'none' or use a checkpoint of this version") from None
    return {f"rng.{key}": value for key, value in state["rng"].items()}, state["data"]


def _set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


class CheckpointReadError(UserError):
    """A checkpoint file that is not loaded: unreadable, or one that could run code."""


class CheckpointWriteError(UserError):
    """The disk (or quota) is full: a checkpoint could not be written."""


class CheckpointMismatch(UserError):
    """A checkpoint saved with other model settings than those of the run that resumes it."""


def saved_model_tensors(step_dir: str | Path, part: str = "model") -> dict[str, TensorStorageMetadata]:
    """The tensors of ``part`` (``model``, or :data:`EMA_WEIGHTS`) a checkpoint holds, by name without
    the part's prefix, with their global metadata."""
    items = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata.items()
    prefix = f"{part}."
    return {key[len(prefix):]: item for key, item in items
            if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)}


def check_model_matches(path: Path, model_state: dict[str, Any]) -> None:
    """Raise :class:`CheckpointMismatch` when the checkpoint at ``path`` holds other model tensors (names or
    global shapes) than ``model_state``: DCP would fail with a long traceback, or silently drop the extra ones."""
    expected = {key: list(value.shape) for key, value in model_state.items()}
    # Full fine-tunes saved while training still built the unused LM head hold it; it is not resumed.
    saved = {key: list(item.size) for key, item in saved_model_tensors(path).items()
             if key in expected or not key.startswith(LM_HEAD)}
    fix = ("resume with the original settings, or start fresh with --set checkpoint.resume=none or a new "
           "logging.output_dir")
    only_saved, only_expected = saved.keys() - expected.keys(), expected.keys() - saved.keys()
    if only_saved or only_expected:
        parts = [f"the config's model lacks {len(only_saved)} of its tensors: {listing(only_saved, 2)}"
                 if only_saved else "",
                 f"it lacks {len(only_expected)} tensors of the config's model: {listing(only_expected, 2)}"
                 if only_expected else ""]
        raise CheckpointMismatch(f"checkpoint {path} does not match the config (lora.kind, lora.targets, "
                                 "lora.train_heads, lora.include_visual, train.mode or model.base_quantization "
                                 "changed?): "
                                 + "; ".join(filter(None, parts)) + f"; {fix}")
    for key in sorted(expected):
        if saved[key] != expected[key]:
            raise CheckpointMismatch(f"checkpoint {path}: shape of {key} is {saved[key]} but the config gives "
                                     f"{expected[key]} (lora.rank changed?); {fix}")


def read_fp32_moments_where_saved(path: Path, optim_state: dict) -> None:
    """Checkpoints of torch AdamW, or of the 8-bit AdamW before it saved its codes, hold fp32 ``exp_avg`` and
    ``exp_avg_sq`` where the 8-bit optimizer now has ``*_codes`` and ``*_scales``: ask DCP for the fp32 tensors
    instead (shaped and sharded like the codes); the optimizer quantises them when it loads its state."""
    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata.keys()
    for name, state in optim_state.get("state", {}).items():
        for moment in ("exp_avg", "exp_avg_sq"):
            codes = state.get(f"{moment}_codes")
            if codes is not None and f"optim.state.{name}.{moment}" in saved:
                del state[f"{moment}_codes"], state[f"{moment}_scales"]
                # In host memory, as they were saved: 4 bytes per element would not fit next to the model.
                state[moment] = torch.zeros_like(codes.to("cpu"), dtype=torch.float32)


def _disk_full(error: BaseException | None) -> bool:
    """Whether ``error``, an exception it was raised from, or a rank's failure that DCP collected, is ENOSPC or
    EDQUOT."""
    seen = set()
    pending = [error]
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        # DCP keeps each rank's failure as (exception, traceback summary).
        failures = [failure[0] for failure in getattr(e, "failures", {}).values()]
        pending += [e.__cause__, e.__context__, *failures]
    return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    def __init__(self, root: Path, keep_last: int, rank: int, world_size: int, trainable_only: bool,
                 lock: OutputLock | None = None):
        self.root = Path(root)
        self.lock = lock  # the output folder's, on rank 0: checked before each write and commit
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.options = StateDictOptions(ignore_frozen_params=trainable_only)
        # dcp.load already fails on any key the checkpoint lacks; strict=False only lets frozen weights
        # (loaded from the base model, not the checkpoint) stay out of the LoRA state.
        self.load_options = StateDictOptions(ignore_frozen_params=trainable_only, strict=False)

    def save(self, step: int, model, optimizer, scheduler, data_state: Any, meta: dict, ema=None) -> Path:
        """Write the checkpoint of ``step`` atomically, with ``ema`` (a :class:`hidream_ft.optim.ema.ParamEma`)
        when given; a full disk is a :class:`CheckpointWriteError` that leaves the previous complete checkpoints
        as they were and removes the partial one."""
        try:
            return self._write(step, model, optimizer, scheduler, data_state, meta, ema)
        except BaseException as e:  # DCP reports the ranks' failures as a CheckpointException(BaseException)
            if not _disk_full(e):
                raise
            if self.rank == 0:
                shutil.rmtree(self.root / f".{step_dir_name(step)}.tmp", ignore_errors=True)
            complete = complete_checkpoints(self.root)
            last = f"the last complete checkpoint, {complete[-1]}, is intact" if complete else "no checkpoint yet"
            raise CheckpointWriteError(f"{self.root}: no space left on the device while writing the checkpoint of "
                                       f"step {step}; {last}. Free space (or raise the quota), then run the same "
                                       f"command again to resume") from None

    def _write(self, step: int, model, optimizer, scheduler, data_state: Any, meta: dict, ema) -> Path:
        final = self.root / step_dir_name(step)
        tmp = self.root / f".{step_dir_name(step)}.tmp"
        if self.rank == 0:
            self._ensure_lock_held()
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        model_state, optim_state = get_state_dict(model, optimizer, options=self.options)
        state = {"model": model_state, "optim": optim_state}
        if ema is not None:
            state[EMA_PART] = ema.state_dict()
        dcp.save(state, checkpoint_id=tmp)
        _save_rank_state(_rank_file(tmp, self.rank), data_state)
        dist.barrier()
        if self.rank == 0:
            info = dict(meta, step=step, world_size=self.world_size, scheduler=scheduler.state_dict())
            (tmp / "meta.json").write_text(json.dumps(info, indent=2))
            (tmp / MARKER).write_text(f"{step}\n")
            _fsync_dir(tmp)
            self._ensure_lock_held()
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            for old in complete_checkpoints(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def _ensure_lock_held(self) -> None:
        if self.lock is not None:
            self.lock.ensure_held()

    def load(self, path: Path, model, optimizer, scheduler, ema=None) -> tuple[int, Any]:
        """Restore everything; returns (step, data state). Resharding (other world size) is supported:
        RNG and data states then come from rank 0's file, re-seeded per rank by the caller's data pipeline.
        A checkpoint saved without an EMA starts ``ema`` (a :class:`hidream_ft.optim.ema.ParamEma`) from the
        restored weights, with a warning."""
        meta = json.loads((path / "meta.json").read_text())
        model_state, optim_state = get_state_dict(model, optimizer, options=self.options)
        check_model_matches(path, model_state)
        read_fp32_moments_where_saved(path, optim_state)
        state = {"model": model_state, "optim": optim_state}
        ema_saved = ema is not None and bool(saved_model_tensors(path, EMA_WEIGHTS))
        if ema_saved:
            state[EMA_PART] = ema.state_dict()  # loaded in place
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self.load_options)
        if ema is not None and not ema_saved:
            ema.restart()
            if self.rank == 0:
                print(f"warning: {path} holds no EMA; the average starts from its weights", file=sys.stderr)
        scheduler.load_state_dict(meta["scheduler"])
        same_world = meta["world_size"] == self.world_size
        rng, data_state = _load_rank_state(path, self.rank if same_world else 0)
        if same_world:
            _set_rng_state(rng)
        return meta["step"], data_state


def load_model_state(step_dir: str | Path, part: str = "model") -> dict[str, torch.Tensor]:
    """The model part of a checkpoint (or with ``part =`` :data:`EMA_WEIGHTS` its averaged weights) as full CPU
    tensors, in one process (no process group needed).

    Keys are those of the trained module: PEFT names (``base_model.model.…lora_A.default.weight``) in LoRA
    mode, plain HiDreamO1 names (``model.language_model.…``) in full mode.
    """
    step_dir = Path(step_dir)
    if not (step_dir / MARKER).is_file():
        raise UserError(f"{step_dir}: not a complete checkpoint (no {MARKER} marker)")
    saved = saved_model_tensors(step_dir, part)
    if part == EMA_WEIGHTS and not saved:
        raise UserError(f"{step_dir}: holds no EMA weights (trained without ema.enabled)")
    state = {f"{part}.{key}": torch.empty(item.size, dtype=item.properties.dtype) for key, item in saved.items()}
    dcp.load(state, checkpoint_id=step_dir, no_dist=True)
    return {key[len(part) + 1:]: value for key, value in state.items()}
