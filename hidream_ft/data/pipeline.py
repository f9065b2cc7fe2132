"""The data pipeline the trainer iterates: optimizer steps of bucketed, collated micro-batches.

Two sources share one contract. Folders are finite: a seeded global plan (``planner.py``) gives every image
exactly once per epoch and all ranks the same number of steps. Shards stream endlessly (``shards.py``). In
both, a micro-batch's content is a pure function of the seed and the data position, whichever DataLoader
worker builds it, and each carries the position after it, so ``state_dict()`` is exact at every step.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections import Counter
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hidream_ft.config import ConfigError, DataConfig
from hidream_ft.data.buckets import Stage, bucket_histogram, histogram_text, resolve_stages, stage_assignment, stage_at
from hidream_ft.data.folders import FolderItem, fingerprint, scan_folders
from hidream_ft.data.paired import ShapeGroups, attach_controls, group_by_shape, with_references
from hidream_ft.data.planner import EpochPlanner, PlannedBatch
from hidream_ft.data.samples import Sample, make_sample, rng_for
from hidream_ft.data.shards import (
    StreamReader,
    expand_shards,
    fresh_cursor,
    read_manifest_sizes,
    shards_fingerprint,
)
from hidream_ft.data.stats import full_report, record
from hidream_ft.runtime.preemption import ignore_preemption_signals

log = logging.getLogger("hidream_ft.data")

STATE_VERSION = 1
# A planned image that fails to decode is replaced by a random image of the same bucket, then of any bucket.
_SAME_BUCKET_TRIES = 4
_ANY_BUCKET_TRIES = 4


def list_of_samples(samples: list[Sample]) -> list[Sample]:
    """The simplest collate: the micro-batch as a list of :class:`Sample` (module-level, so it pickles)."""
    return samples


def _pass_through(output):
    return output


class WorkerOutput(NamedTuple):
    batch: Any  # what the trainer's collate made of the micro-batch's samples
    counts: dict[str, int]  # events counted in the worker since its previous output
    position: dict  # data position after the step this micro-batch belongs to (folders) or after it (shards)


def _worker_identity() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class FolderBatches(IterableDataset):
    """This rank's micro-batches of the global folder plan; DataLoader worker w builds every W-th one."""

    def __init__(self, items, shapes: ShapeGroups, cfg, seed, rank, world_size, grad_accum, first_step, position,
                 collate):
        super().__init__()
        self.items: list[FolderItem] = items
        self.shapes = shapes  # buckets split by reference sizes, so that a micro-batch holds one shape
        self.stages: list[Stage] = shapes.stages
        self.assignments: list[np.ndarray] = shapes.assignments
        self.cfg: DataConfig = cfg
        self.seed, self.rank, self.world_size, self.grad_accum = seed, rank, world_size, grad_accum
        self.first_step = first_step
        self.position = position
        self.collate = collate

    def __iter__(self):
        worker, num_workers = _worker_identity()
        repeats = np.array([item.repeats for item in self.items])
        planner = EpochPlanner(repeats, self.seed, self.position["epoch"], self.position["cursor"],
                               self.position["pending"])
        counts: Counter = Counter()
        stage = None
        # Steps before first_step are only planned (a resume without a saved position replays the plan).
        for step in itertools.count(self.position["next_step"]):
            if stage_at(self.stages, step) is not stage:
                stage = stage_at(self.stages, step)
                planner.set_stage(self.assignments[stage.index], stage.batch_size)
            planned = [planner.next_batch() for _ in range(self.world_size * self.grad_accum)]
            if step < self.first_step:
                continue
            position = {"next_step": step + 1, **planner.position()}
            for a in range(self.grad_accum):
                if ((step - self.first_step) * self.grad_accum + a) % num_workers != worker:
                    continue
                samples = self._load(planned[self.rank * self.grad_accum + a], stage, step, counts)
                yield WorkerOutput(self.collate(samples), dict(counts), position)
                counts.clear()

    def _load(self, batch: PlannedBatch, stage: Stage, step: int, counts: Counter) -> list[Sample]:
        bucket = stage.buckets[batch.bucket]
        samples = []
        for position, item in zip(batch.positions, batch.items):
            sample = self._sample(item, bucket, (batch.epoch, position), counts)
            if sample is None:
                sample = self._replacement(batch, position, stage, counts)
            if sample is not None:
                samples.append(sample)
        if len(samples) < len(batch.items):
            record(counts, "batch_short")
        if not samples:
            raise RuntimeError(
                f"data: no image of a step {step} micro-batch, nor any of its replacements, could be decoded; "
                "see the corrupt_image warnings"
            )
        return samples

    def _sample(self, index: int, bucket, seed_parts: tuple, counts: Counter) -> Sample | None:
        item = self.items[index]
        sample = make_sample(item.path, item.path, item.key, item.caption, item.weight, bucket, self.cfg,
                             (self.seed, *seed_parts), counts)
        return with_references(sample, item.controls, bucket, self.cfg, counts)

    def _replacement(self, batch: PlannedBatch, position: int, stage: Stage, counts: Counter) -> Sample | None:
        assignment = self.assignments[stage.index]
        same_bucket = np.flatnonzero(assignment == batch.bucket)
        usable = self.shapes.interchangeable(stage, batch.bucket)
        rng = rng_for("replace", self.seed, batch.epoch, position)
        for attempt in range(_SAME_BUCKET_TRIES + _ANY_BUCKET_TRIES):
            pool = same_bucket if attempt < _SAME_BUCKET_TRIES else usable
            index = int(pool[rng.randrange(len(pool))])
            seed_parts = (batch.epoch, position, "replacement", attempt)
            sample = self._sample(index, stage.buckets[batch.bucket], seed_parts, counts)
            if sample is not None:
                record(counts, "replacement_used")
                return sample
        return None


class ShardBatches(IterableDataset):
    """This rank's streamed micro-batches; DataLoader worker w runs stream (first output + w) mod W."""

    def __init__(self, urls, stages, cfg, seed, rank, grad_accum, first_step, cursors, generation, collate):
        super().__init__()
        self.urls, self.stages, self.cfg = urls, stages, cfg
        self.seed, self.rank, self.grad_accum = seed, rank, grad_accum
        self.first_step = first_step
        self.cursors: list[dict] = cursors
        self.generation = generation
        self.collate = collate

    def __iter__(self):
        worker, num_workers = _worker_identity()
        stream = (self.first_step * self.grad_accum + worker) % num_workers
        reader = StreamReader(self.urls, self.stages, self.cfg, self.seed, self.generation, self.rank, num_workers,
                              self.grad_accum, self.cursors[stream])
        for samples, position in reader.batches():
            yield WorkerOutput(self.collate(samples), dict(reader.counts), position)
            reader.counts.clear()


class Pipeline:
    """Iterate optimizer steps; see :func:`build_pipeline`."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, seed: int, default_batch_size: int,
                 collate: Callable[[list[Sample]], Any]):
        cfg.validate("data")
        if not cfg.folders and not cfg.shards:
            raise ConfigError("data: no training data; set data.folders or data.shards")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cfg, self.rank, self.world_size, self.seed, self.collate = cfg, rank, world_size, seed, collate
        self.stages = resolve_stages(cfg, default_batch_size)
        self.num_streams = max(1, cfg.num_workers)
        self._counts: Counter = Counter()
        scan_counts: Counter = Counter()
        if cfg.folders:
            self.mode = "folder"
            self.items = attach_controls(scan_folders(cfg.folders, cfg.missing_caption, scan_counts), cfg.folders,
                                         cfg.missing_control, scan_counts)
            self.fingerprint = fingerprint(self.items)
            widths = [item.width for item in self.items]
            heights = [item.height for item in self.items]
            self._assignments = [stage_assignment(widths, heights, s, cfg.small_images) for s in self.stages]
            for stage, assignment in zip(self.stages, self._assignments):
                if not (assignment >= 0).any():
                    raise ConfigError(
                        f"data: every image is smaller than its bucket in {stage.describe()} and "
                        "small_images = 'skip'; lower the area or use small_images = 'upscale'"
                    )
        else:
            self.mode = "shards"
            self.urls = expand_shards(cfg.shards)
            self.fingerprint = shards_fingerprint(self.urls)
        if rank == 0:  # dataset-level events: counted once, so that summing over ranks stays right
            self._counts.update(scan_counts)
            if self.mode == "folder":
                log.info("data: %d images from %d folder(s)", len(self.items), len(cfg.folders))
        self._state = self._initial_state(0)

    # -- state -----------------------------------------------------------------------------------------

    def _initial_state(self, next_step: int) -> dict:
        state = {"version": STATE_VERSION, "mode": self.mode, "seed": self.seed, "fingerprint": self.fingerprint,
                 "next_step": next_step}
        if self.mode == "folder":
            state.update(epoch=0, cursor=0, pending=[])
        else:
            state.update(rank=self.rank, num_streams=self.num_streams, grad_accum=None, generation=next_step,
                         streams=[None] * self.num_streams)
        return state

    def state_dict(self) -> dict:
        """Data position after the last step ``iterate`` yielded, plus the counters (small, picklable).
        Folder positions are the same on every rank; shard positions are per rank — save each rank's."""
        return copy.deepcopy({**self._state, "stats": dict(self._counts)})

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from ``state_dict``) at the next ``iterate``."""
        if state.get("version") != STATE_VERSION or state.get("mode") != self.mode:
            raise ValueError(
                f"data state (version {state.get('version')}, mode {state.get('mode')!r}) does not fit this "
                f"pipeline (version {STATE_VERSION}, mode {self.mode!r})"
            )
        self._counts = Counter(state.get("stats", {}))
        self._state = {key: value for key, value in state.items() if key != "stats"}

    def stats(self) -> dict[str, int]:
        """Per-reason counters of this rank (see docs/data.md); sum them over ranks for totals."""
        return full_report(self._counts)

    # -- iteration -------------------------------------------------------------------------------------

    def iterate(self, start_step: int = 0, grad_accum: int = 1):
        """Endless ``(step, micro_batches)`` from ``start_step``: ``micro_batches`` holds ``grad_accum``
        collated micro-batches. Stages switch at their step boundaries; epochs roll over inside."""
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be at least 1, got {grad_accum}")
        if start_step < 0:
            raise ValueError(f"start_step must be at least 0, got {start_step}")
        dataset = self._dataset(start_step, grad_accum)
        workers = self.cfg.num_workers
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            collate_fn=_pass_through,
            pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
            prefetch_factor=self.cfg.prefetch_factor if workers else None,
            # SLURM signals every process; workers leave preemption to the trainer, which checkpoints first.
            worker_init_fn=ignore_preemption_signals,
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
                    output: WorkerOutput = next(outputs)
                    self._counts.update(output.counts)
                    self._advance(output.position)
                    micro_batches.append(output.batch)
                self._state["next_step"] = step + 1
                yield step, micro_batches
        finally:
            del outputs  # shuts the workers down when the trainer stops iterating

    def _dataset(self, start_step: int, grad_accum: int) -> IterableDataset:
        """The DataLoader's dataset, starting from the current position (fresh, loaded, or where a previous
        ``iterate`` stopped)."""
        if self.mode == "folder":
            position = self._folder_position(start_step)
            self._state = {**self._initial_state(position["next_step"]), **position}
            shapes = group_by_shape(self.stages, self._assignments, self.items)
            return FolderBatches(self.items, shapes, self.cfg, self.seed, self.rank, self.world_size, grad_accum,
                                 start_step, position, self.collate)
        cursors, generation = self._stream_cursors(start_step, grad_accum)
        self._state = {**self._initial_state(start_step), "generation": generation, "grad_accum": grad_accum,
                       "streams": [dict(cursor) for cursor in cursors]}
        return ShardBatches(self.urls, self.stages, self.cfg, self.seed, self.rank, grad_accum, start_step,
                            cursors, generation, self.collate)

    def _folder_position(self, start_step: int) -> dict:
        saved = self._state
        if saved["fingerprint"] != self.fingerprint or saved["seed"] != self.seed:
            log.warning("data: the images or the seed changed since the data position was saved; "
                        "starting a new epoch (%d) at step %d", saved["epoch"] + 1, start_step)
            return {"next_step": start_step, "epoch": saved["epoch"] + 1, "cursor": 0, "pending": []}
        if start_step < saved["next_step"]:
            raise ValueError(
                f"data: start_step {start_step} is before the data position (step {saved['next_step']}); "
                "load the data state saved with the model checkpoint you resume from"
            )
        if start_step > saved["next_step"] and self.rank == 0:
            log.info("data: replaying the data plan from step %d to step %d", saved["next_step"], start_step)
        return {key: saved[key] for key in ("next_step", "epoch", "cursor", "pending")}

    def _stream_cursors(self, start_step: int, grad_accum: int) -> tuple[list[dict], int]:
        saved = self._state
        if None not in saved["streams"]:  # a position to continue from
            identity = (self.seed, self.fingerprint, self.rank, self.num_streams, grad_accum, start_step)
            if identity == (saved["seed"], saved["fingerprint"], saved["rank"], saved["num_streams"],
                            saved["grad_accum"], saved["next_step"]):
                return [dict(cursor) for cursor in saved["streams"]], saved["generation"]
            log.warning(
                "data (rank %d): the shard position was saved for another rank, seed, shard list, worker count, "
                "grad_accum or step; streams restart from a fresh position derived from step %d "
                "(save and load each rank's own data state for an exact resume)", self.rank, start_step)
        first_output = start_step * grad_accum
        return [fresh_cursor(s, first_output, self.num_streams) for s in range(self.num_streams)], start_step

    def _advance(self, position: dict) -> None:
        if self.mode == "folder":
            self._state.update(position)
        else:
            self._state["streams"][position["stream"]] = position

    def _enter_stage(self, stage: Stage, begins: bool) -> None:
        """Log the stage's bucket histogram (rank 0). For folders, count the images the stage skips as too
        small when it ``begins``, not again on a resume inside it."""
        if self.rank != 0:
            return
        if self.mode == "folder" and begins:
            skipped = int((self._assignments[stage.index] < 0).sum())
            if skipped:
                self._counts["too_small_skipped"] += skipped
                log.warning("data: %d images are smaller than their bucket in %s and are skipped "
                            "(small_images = 'skip')", skipped, stage.describe())
        log.info("data %s: %d buckets; samples per bucket: %s", stage.describe(), len(stage.buckets),
                 self._histogram(stage))

    def _histogram(self, stage: Stage) -> str:
        if self.mode == "folder":
            assignment, weights = self._assignments[stage.index], [item.repeats for item in self.items]
        else:
            sizes = read_manifest_sizes(self.urls)
            if sizes is None:
                return "unknown (the shards have no manifest.json from python -m hidream_ft.data.pack)"
            widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
            assignment = stage_assignment(widths, heights, stage, self.cfg.small_images)
            weights = list(sizes.values())
        return histogram_text(bucket_histogram(assignment, weights, stage.buckets))


def build_pipeline(
    cfg: DataConfig,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    seed: int = 0,
    default_batch_size: int = 1,
    collate: Callable[[list[Sample]], Any] = list_of_samples,
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
