"""The data pipeline the trainer iterates: optimizer steps of bucketed, collated micro-batches from a
:class:`~hidream_ft.data.sources.Source`, with a data state that resumes exactly at every step."""

from __future__ import annotations

import copy
import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections import Counter

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from hidream_ft.config import ConfigError, DataConfig
from hidream_ft.data.buckets import Stage, resolve_stages, stage_at
from hidream_ft.data.samples import Sample
from hidream_ft.data.errors import DataError
from hidream_ft.data.sources import Collate, DataFailure, IndexedFolders, Source, StreamedShards, WorkerOutput
from hidream_ft.data.stats import REASONS, full_report
from hidream_ft.runtime.preemption import ignore_preemption_signals

log = logging.getLogger("hidream_ft.data")

STATE_VERSION = 1


def list_of_samples(samples: list[Sample]) -> list[Sample]:
    """The simplest collate: the micro-batch as a list of :class:`Sample` (module-level, so it pickles)."""
    return samples


def _pass_through(output):
    return output


class _WorkerLifetime:
    """The DataLoader's ``worker_init_fn``: workers ignore the preemption signals, which only the trainer acts
    on, and exit as soon as :meth:`end` is called. Ignoring SIGTERM also ignores the DataLoader's and
    multiprocessing's way of ending a worker that is still busy, and the process would wait for it forever
    when it exits; a worker in the middle of a micro-batch or of a long run of skipped samples is busy."""

    def __init__(self):
        # A flag in shared memory, polled: a multiprocessing.Event's set() waits for every waiter to wake,
        # forever when one of them has already exited.
        self._ended = multiprocessing.RawValue("b", 0)

    def __call__(self, worker_id: int) -> None:
        ignore_preemption_signals()
        threading.Thread(target=self._exit_when_ended, daemon=True).start()

    def _exit_when_ended(self) -> None:
        while not self._ended.value:
            time.sleep(0.05)
        os._exit(0)  # status 0: DataLoader's SIGCHLD check reports any other status as a crashed worker

    def end(self) -> None:
        self._ended.value = 1


class Pipeline:
    """Iterate optimizer steps; see :func:`build_pipeline`."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, seed: int, default_batch_size: int,
                 collate: Collate):
        cfg.validate("data")
        if not cfg.folders and not cfg.shards:
            raise ConfigError("data: no training data; set data.folders or data.shards")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cfg, self.rank, self.world_size, self.seed, self.collate = cfg, rank, world_size, seed, collate
        self.stages = resolve_stages(cfg, default_batch_size)
        self._counts: Counter = Counter()
        scan_counts: Counter = Counter()
        self.source: Source = (IndexedFolders(cfg, self.stages, seed, rank, world_size, scan_counts) if cfg.folders
                               else StreamedShards(cfg, self.stages, seed, rank))
        if rank == 0:  # dataset-level events: counted once, so that summing over ranks stays right
            self._counts.update(scan_counts)
        self._state = self._with_identity(self.source.fresh_position())

    # -- state -----------------------------------------------------------------------------------------

    def _with_identity(self, position: dict) -> dict:
        """The data state: what wrote it (version, source mode, seed, data fingerprint) and the position."""
        return {"version": STATE_VERSION, "mode": self.source.mode, "seed": self.seed,
                "fingerprint": self.source.fingerprint, **position}

    def state_dict(self) -> dict:
        """Data position after the last step ``iterate`` yielded, plus the counters (small, picklable).
        Folder positions are the same on every rank; shard positions are per rank — save each rank's."""
        return copy.deepcopy({**self._state, "stats": dict(self._counts)})

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from ``state_dict``) at the next ``iterate``."""
        if state.get("version") != STATE_VERSION or state.get("mode") != self.source.mode:
            raise ConfigError(
                f"data state (version {state.get('version')}, mode {state.get('mode')!r}) does not fit this "
                f"pipeline (version {STATE_VERSION}, mode {self.source.mode!r}): the checkpoint was saved with "
                "other data sources (data.folders / data.shards) or by another version; resume with the original "
                "settings, or start fresh with --set checkpoint.resume=none"
            )
        self._counts = Counter(state.get("stats", {}))
        self._state = {key: value for key, value in state.items() if key != "stats"}

    def stats(self) -> dict[str, int]:
        """Per-reason counters of this rank (see docs/data.md); :meth:`total_stats` sums them over ranks."""
        return full_report(self._counts)

    def total_stats(self, device: torch.device | str = "cpu") -> dict[str, int]:
        """The counters summed over all ranks: a collective (one all-reduce on ``device``, which must suit the
        process group's backend) when torch.distributed is initialised, so call it on every rank alike."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.stats()
        counts = torch.tensor([self._counts.get(reason, 0) for reason in REASONS], dtype=torch.int64,
                              device=device)
        dist.all_reduce(counts)
        return dict(zip(REASONS, counts.tolist()))

    # -- iteration -------------------------------------------------------------------------------------

    def iterate(self, start_step: int = 0, grad_accum: int = 1):
        """Endless ``(step, micro_batches)`` from ``start_step``: ``micro_batches`` holds ``grad_accum``
        collated micro-batches. Stages switch at their step boundaries; epochs roll over inside."""
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be at least 1, got {grad_accum}")
        if start_step < 0:
            raise ValueError(f"start_step must be at least 0, got {start_step}")
        dataset, position = self.source.start(self._state, start_step, grad_accum, self.collate)
        self._state = self._with_identity(position)
        workers = self.cfg.num_workers
        # SLURM signals every process; workers leave preemption to the trainer, which checkpoints first.
        lifetime = _WorkerLifetime()
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            collate_fn=_pass_through,
            pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
            prefetch_factor=self.cfg.prefetch_factor if workers else None,
            worker_init_fn=lifetime,
        )
        outputs = iter(loader)
        stage = None
        try:
            for step in itertools.count(start_step):
                if stage_at(self.stages, step) is not stage:
                    stage = stage_at(self.stages, step)
                    self._enter_stage(stage, begins=step == stage.first_step)
                micro_batches = []
                for _ in range(grad_accum):
                    output: WorkerOutput | DataFailure = next(outputs)
                    self._counts.update(output.counts)
                    if isinstance(output, DataFailure):
                        raise DataError(output.message)
                    self.source.advance(self._state, output.position)
                    micro_batches.append(output.batch)
                self._state["next_step"] = step + 1
                yield step, micro_batches
        finally:
            del outputs  # shuts idle workers down when the trainer stops iterating or the data fails
            lifetime.end()  # and any that is still busy, or all when an exception's traceback holds the loader

    def _enter_stage(self, stage: Stage, begins: bool) -> None:
        """Log the stage's bucket histogram (rank 0). Count the images the stage skips as too small when it
        ``begins``, not again on a resume inside it."""
        if self.rank != 0:
            return
        skipped = self.source.too_small_skipped(stage) if begins else 0
        if skipped:
            self._counts["too_small_skipped"] += skipped
            log.warning("data: %d images are smaller than their bucket in %s and are skipped "
                        "(small_images = 'skip')", skipped, stage.describe())
        log.info("data %s: %d buckets; samples per bucket: %s", stage.describe(), len(stage.buckets),
                 self.source.histogram(stage))


def build_pipeline(
    cfg: DataConfig,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    seed: int = 0,
    default_batch_size: int = 1,
    collate: Collate = list_of_samples,
) -> Pipeline:
    """Index the data (folders) or shard list and resolve the stages. ``rank``/``world_size`` default to
    torch.distributed's when it is initialised, else 0 and 1. ``collate`` runs in the DataLoader workers and
    must pickle (a module-level function). ``default_batch_size`` is the per-rank micro-batch of stages that
    set none."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if distributed else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if distributed else 1
    return Pipeline(cfg, rank, world_size, seed, default_batch_size, collate)
