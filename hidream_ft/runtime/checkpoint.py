"""Sharded, atomic, reshardable checkpoints with torch.distributed.checkpoint (DCP).

    checkpoints/step-00000100/
        .metadata, __*_*.distcp     model (LoRA: trainable parameters only) + optimizer, as DCP shards
        rank-00000.pt …             per-rank RNG states and data-loader position
        meta.json                   step, LR-scheduler state, world size, mode, LoRA settings
        COMPLETE                    commit marker, written last

Every rank writes into ``.step-N.tmp``; rank 0 writes the marker and renames the folder once all ranks are
done, so a folder named ``step-N`` is always whole. A folder without its marker is ignored by resume.
Because DCP stores global tensors, a checkpoint written by R ranks loads on any other number of ranks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_state_dict, set_state_dict,
)

MARKER = "COMPLETE"
PREFIX = "step-"


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
        raise FileNotFoundError(f"checkpoint.resume = {resume!r}: not a complete checkpoint (no {MARKER} marker)")
    return path


def _rng_state() -> dict:
    """Global RNG streams (LoRA dropout); diffusion noise is seeded per sample and needs no state."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    def __init__(self, root: Path, keep_last: int, rank: int, world_size: int, trainable_only: bool):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.options = StateDictOptions(ignore_frozen_params=trainable_only)
        # dcp.load already fails on any key the checkpoint lacks; strict=False only lets frozen weights
        # (loaded from the base model, not the checkpoint) stay out of the LoRA state.
        self.load_options = StateDictOptions(ignore_frozen_params=trainable_only, strict=False)

    def save(self, step: int, model, optimizer, scheduler, data_state: Any, meta: dict) -> Path:
        final = self.root / step_dir_name(step)
        tmp = self.root / f".{step_dir_name(step)}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        model_state, optim_state = get_state_dict(model, optimizer, options=self.options)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
        torch.save({"rng": _rng_state(), "data": data_state}, tmp / f"rank-{self.rank:05d}.pt")
        dist.barrier()
        if self.rank == 0:
            info = dict(meta, step=step, world_size=self.world_size, scheduler=scheduler.state_dict())
            (tmp / "meta.json").write_text(json.dumps(info, indent=2))
            (tmp / MARKER).write_text(f"{step}\n")
            _fsync_dir(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            for old in complete_checkpoints(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def load(self, path: Path, model, optimizer, scheduler) -> tuple[int, Any]:
        """Restore everything; returns (step, data state). Resharding (other world size) is supported:
        RNG and data states then come from rank 0's file, re-seeded per rank by the caller's data pipeline."""
        meta = json.loads((path / "meta.json").read_text())
        model_state, optim_state = get_state_dict(model, optimizer, options=self.options)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self.load_options)
        scheduler.load_state_dict(meta["scheduler"])
        same_world = meta["world_size"] == self.world_size
        rank_file = path / f"rank-{self.rank if same_world else 0:05d}.pt"
        extra = torch.load(rank_file, weights_only=False)
        if same_world:
            _set_rng_state(extra["rng"])
        return meta["step"], extra["data"]


def read_meta(step_dir: str | Path) -> dict:
    return json.loads((Path(step_dir) / "meta.json").read_text())


def load_model_state(step_dir: str | Path) -> dict[str, torch.Tensor]:
    """The model part of a checkpoint as full CPU tensors, in one process (no process group needed).

    Keys are those of the trained module: PEFT names (``base_model.model.…lora_A.default.weight``) in LoRA
    mode, plain HiDreamO1 names (``model.language_model.…``) in full mode.
    """
    step_dir = Path(step_dir)
    if not (step_dir / MARKER).is_file():
        raise FileNotFoundError(f"{step_dir}: not a complete checkpoint (no {MARKER} marker)")
    metadata = FileSystemReader(str(step_dir)).read_metadata()
    state = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata):
            state[key] = torch.empty(item.size, dtype=item.properties.dtype)
    dcp.load(state, checkpoint_id=step_dir, no_dist=True)
    return {key[len("model."):]: value for key, value in state.items()}
