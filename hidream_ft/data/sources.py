"""The two kinds of training data behind one :class:`Source` interface: indexed folders (a finite, seeded global
plan) and streamed WebDataset shards. Both build each micro-batch from the seed and the data position alone,
whichever DataLoader worker runs, and hand it out with the position after it (docs/data.md)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from abc import ABC, abstractmethod
from collections import Counter
from typing import Any, Callable, NamedTuple

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from hidream_ft.config import ConfigError, DataConfig
from hidream_ft.data.buckets import Stage, bucket_histogram, histogram_text, stage_assignment, stage_at
from hidream_ft.data.errors import DataError
from hidream_ft.data.folders import fingerprint, scan_folders
from hidream_ft.data.items import FolderItem
from hidream_ft.data.paired import ShapeGroups, attach_controls, group_by_shape, sample_tokens, with_references
from hidream_ft.data.planner import EpochPlanner, Mixing, PackedSamples, PlannedBatch, mixed_count
from hidream_ft.data.samples import Sample, make_sample, rng_for
from hidream_ft.data.shards import (StreamReader, expand_shards, fresh_cursor, read_manifest_sizes,
                                    shards_fingerprint, survey_shard)
from hidream_ft.data.stats import record
from hidream_ft.errors import UserError

log = logging.getLogger("hidream_ft.data")

Collate = Callable[[list[Sample]], Any]

# A planned image that fails to decode is replaced by a random image of the same bucket, then of any bucket.
_SAME_BUCKET_TRIES = 4
_ANY_BUCKET_TRIES = 4


class WorkerOutput(NamedTuple):
    batch: Any  # what the trainer's collate made of the micro-batch's samples
    counts: dict[str, int]  # events counted in the worker since its previous output
    position: dict  # data position after the step this micro-batch belongs to (folders) or after it (shards)


class DataFailure(NamedTuple):
    """A worker's :class:`UserError` (a :class:`DataError`, a caption the layout refuses), handed over as an
    output: DataLoader would re-raise the exception with the worker's traceback in its message, and the message
    must stay the one line that says what to fix."""

    message: str
    counts: dict[str, int]


def _failures_as_outputs(outputs, counts: Counter):
    """``outputs``, ending with a :class:`DataFailure` when they stop with a :class:`UserError`."""
    try:
        yield from outputs
    except UserError as e:
        yield DataFailure(str(e), dict(counts))


def _worker_identity() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class Source(ABC):
    """Training data as the pipeline sees it. A position is the source's part of the pipeline's saved data
    state (``next_step`` included); the pipeline adds version, mode, seed and fingerprint."""

    mode: str  # the data state's "mode": which kind of source wrote a saved position
    fingerprint: str  # identifies the data; a saved position only applies to the same one

    @abstractmethod
    def fresh_position(self) -> dict:
        """The position of a run that has read nothing."""

    @abstractmethod
    def start(self, saved: dict, start_step: int, grad_accum: int,
              collate: Collate) -> tuple[IterableDataset, dict]:
        """The DataLoader dataset of this rank's micro-batches from ``start_step``, continuing the pipeline's
        ``saved`` data state where it applies, and the position it starts from."""

    @abstractmethod
    def advance(self, state: dict, position: dict) -> None:
        """Move the data ``state`` in place to a :class:`WorkerOutput`'s ``position``."""

    @abstractmethod
    def too_small_skipped(self, stage: Stage) -> int:
        """Images ``stage`` leaves out as too small, when known before reading (0 when only reading tells)."""

    @abstractmethod
    def histogram(self, stage: Stage) -> str:
        """The stage's samples per bucket, for the log."""


# -- folders -------------------------------------------------------------------------------------------------


class FolderBatches(IterableDataset):
    """This rank's micro-batches of the global folder plan; DataLoader worker w builds every W-th one."""

    def __init__(self, items, repeats, mixing, shapes: ShapeGroups, costs, cfg, seed, rank, world_size, grad_accum,
                 first_step, position, collate):
        super().__init__()
        self.items: list[FolderItem] = items
        self.repeats: np.ndarray = repeats  # entries per epoch of each item (0: regularization items)
        self.mixing: Mixing | None = mixing  # the regularization entries mixed into each epoch
        self.costs: list[np.ndarray | None] = costs  # per stage: each item's tokens when the stage packs
        self.shapes = shapes  # buckets split by reference sizes, so that a micro-batch holds one shape
        self.stages: list[Stage] = shapes.stages
        self.assignments: list[np.ndarray] = shapes.assignments
        self.cfg: DataConfig = cfg
        self.seed, self.rank, self.world_size, self.grad_accum = seed, rank, world_size, grad_accum
        self.first_step = first_step
        self.position = position
        self.collate = collate

    def __iter__(self):
        counts: Counter = Counter()
        return _failures_as_outputs(self._outputs(counts), counts)

    def _outputs(self, counts: Counter):
        worker, num_workers = _worker_identity()
        planner = EpochPlanner(self.repeats, self.seed, self.position["epoch"], self.position["cursor"],
                               self.position["pending"], self.mixing)
        stage = None
        # Steps before first_step are only planned (a resume without a saved position replays the plan).
        for step in itertools.count(self.position["next_step"]):
            if stage_at(self.stages, step) is not stage:
                stage = stage_at(self.stages, step)
                planner.set_stage(self.assignments[stage.index], stage.batch_size, self.costs[stage.index],
                                  stage.max_tokens)
            planned = [planner.next_batch() for _ in range(self.world_size * self.grad_accum)]
            if step < self.first_step:
                continue
            position = {"next_step": step + 1, **planner.position()}
            for a in range(self.grad_accum):
                if ((step - self.first_step) * self.grad_accum + a) % num_workers != worker:
                    continue
                samples = self._load(planned[self.rank * self.grad_accum + a], stage, step, counts)
                if stage.max_tokens:
                    samples = PackedSamples(samples, stage.max_tokens)
                yield WorkerOutput(self.collate(samples), dict(counts), position)
                counts.clear()

    def _load(self, batch: PlannedBatch, stage: Stage, step: int, counts: Counter) -> list[Sample]:
        samples = []
        for position, item, key in zip(batch.positions, batch.items, batch.buckets):
            sample = self._sample(item, stage.buckets[key], (batch.epoch, position), counts)
            if sample is None:
                sample = self._replacement(key, batch.epoch, position, stage, counts)
            if sample is not None:
                samples.append(sample)
        if len(samples) < len(batch.items):
            record(counts, "batch_short")
        if not samples:
            raise DataError(
                f"data: no image of a step {step} micro-batch, nor any of its replacements, could be decoded; "
                "see the corrupt_image warnings"
            )
        return samples

    def _sample(self, index: int, bucket, seed_parts: tuple, counts: Counter) -> Sample | None:
        item = self.items[index]
        record(counts, "samples_read")
        sample = make_sample(item.path, item.path, item.key, item.caption, item.weight, bucket, self.cfg,
                             (self.seed, *seed_parts), counts, item.mask)
        return with_references(sample, item.controls, bucket, self.cfg, counts)

    def _replacement(self, key: int, epoch: int, position: int, stage: Stage, counts: Counter) -> Sample | None:
        """A random decodable item rendered at bucket ``key``: the same shape, so also the same token cost."""
        assignment = self.assignments[stage.index]
        same_bucket = np.flatnonzero(assignment == key)
        usable = self.shapes.interchangeable(stage, key)
        rng = rng_for("replace", self.seed, epoch, position)
        for attempt in range(_SAME_BUCKET_TRIES + _ANY_BUCKET_TRIES):
            pool = same_bucket if attempt < _SAME_BUCKET_TRIES else usable
            index = int(pool[rng.randrange(len(pool))])
            seed_parts = (epoch, position, "replacement", attempt)
            sample = self._sample(index, stage.buckets[key], seed_parts, counts)
            if sample is not None:
                record(counts, "replacement_used")
                return sample
        return None


def _regularization_items(cfg: DataConfig, counts: Counter) -> list[FolderItem]:
    """The items of ``data.regularization.folders``, their keys prefixed and their loss weights multiplied."""
    regularization = cfg.regularization
    if not regularization.folders:
        return []
    items = scan_folders(regularization.folders, cfg.missing_caption, counts, "data.regularization.folders")
    return [dataclasses.replace(item, key=f"regularization/{item.key}", weight=item.weight * regularization.weight)
            for item in attach_controls(items, regularization.folders, cfg.missing_control, counts)]


class IndexedFolders(Source):
    """Image folders, indexed at start; every rank plans the same epochs and takes its slice of each step.
    The position (epoch, next entry, entries still queued) is the same on every rank. Regularization folders
    (``data.regularization``) are indexed after the training folders; their items enter each epoch's plan as
    its mixed share rather than by their repeats."""

    mode = "folder"

    def __init__(self, cfg: DataConfig, stages: list[Stage], seed: int, rank: int, world_size: int,
                 scan_counts: Counter):
        self.cfg, self.stages, self.seed, self.rank, self.world_size = cfg, stages, seed, rank, world_size
        trained = attach_controls(scan_folders(cfg.folders, cfg.missing_caption, scan_counts), cfg.folders,
                                  cfg.missing_control, scan_counts)
        self.items = trained + _regularization_items(cfg, scan_counts)
        is_mixed = np.arange(len(self.items)) >= len(trained)
        all_repeats = np.array([item.repeats for item in self.items])
        self.repeats = np.where(is_mixed, 0, all_repeats)
        self.mixing = None
        self.fingerprint = fingerprint(self.items)
        if is_mixed.any():
            self.mixing = Mixing(np.repeat(np.flatnonzero(is_mixed), all_repeats[is_mixed]),
                                 mixed_count(int(self.repeats.sum()), cfg.regularization.ratio))
            self.fingerprint += f"+{self.mixing.per_epoch}"  # a position counts entries of a mix of this size
        widths = [item.width for item in self.items]
        heights = [item.height for item in self.items]
        self.assignments = [stage_assignment(widths, heights, s, cfg.small_images) for s in stages]
        for stage, assignment in zip(stages, self.assignments):
            if not (assignment >= 0).any():
                raise ConfigError(
                    f"data: every image is smaller than its bucket in {stage.describe()} and "
                    "small_images = 'skip'; lower the area or use small_images = 'upscale'"
                )
        self.costs = [self._token_costs(s, a) if s.max_tokens else None for s, a in zip(stages, self.assignments)]
        if rank == 0:
            log.info("data: %d images from %d folder(s)", len(self.items), len(cfg.folders))

    def _token_costs(self, stage: Stage, assignment: np.ndarray) -> np.ndarray:
        """Each item's sequence length in a packing ``stage`` (0 when the stage leaves it out); a ConfigError
        names the bucket of an item longer than the stage's max_tokens."""
        max_text = self.cfg.max_text_tokens
        plain = np.array([sample_tokens(bucket, None, max_text) for bucket in stage.buckets])
        costs = np.where(assignment >= 0, plain[np.maximum(assignment, 0)], 0)
        for index, item in enumerate(self.items):
            if item.controls is not None and assignment[index] >= 0:
                costs[index] = sample_tokens(stage.buckets[assignment[index]], item.controls.sizes, max_text)
        longest = int(np.argmax(costs))
        if costs[longest] > stage.max_tokens:
            width, height = stage.buckets[assignment[longest]]
            references = "" if self.items[longest].controls is None else " with its references"
            raise ConfigError(
                f"data: in {stage.describe()}, a sample of bucket {width}x{height}{references} takes up to "
                f"{costs[longest]} tokens (data.max_text_tokens = {max_text} plus its image tokens), over "
                f"max_tokens = {stage.max_tokens}; raise max_tokens or lower the area or data.max_text_tokens"
            )
        return costs

    def fresh_position(self) -> dict:
        return {"next_step": 0, "epoch": 0, "cursor": 0, "pending": []}

    def start(self, saved: dict, start_step: int, grad_accum: int,
              collate: Collate) -> tuple[IterableDataset, dict]:
        position = self._continued_position(saved, start_step)
        shapes = group_by_shape(self.stages, self.assignments, self.items)
        dataset = FolderBatches(self.items, self.repeats, self.mixing, shapes, self.costs, self.cfg, self.seed,
                                self.rank, self.world_size, grad_accum, start_step, position, collate)
        return dataset, position

    def _continued_position(self, saved: dict, start_step: int) -> dict:
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

    def advance(self, state: dict, position: dict) -> None:
        state.update(position)

    def too_small_skipped(self, stage: Stage) -> int:
        return int((self.assignments[stage.index] < 0).sum())

    def histogram(self, stage: Stage) -> str:
        weights = [item.repeats for item in self.items]
        return histogram_text(bucket_histogram(self.assignments[stage.index], weights, stage.buckets))


# -- shards --------------------------------------------------------------------------------------------------


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
        return _failures_as_outputs(self._outputs(reader), reader.counts)

    def _outputs(self, reader: StreamReader):
        for samples, position in reader.batches():
            yield WorkerOutput(self.collate(samples), dict(reader.counts), position)
            reader.counts.clear()


class StreamedShards(Source):
    """WebDataset shards, read as endless seeded streams, one per DataLoader worker and rank. The position
    (one cursor per stream) differs per rank: each rank saves and loads its own."""

    mode = "shards"

    def __init__(self, cfg: DataConfig, stages: list[Stage], seed: int, rank: int):
        self.cfg, self.stages, self.seed, self.rank = cfg, stages, seed, rank
        self.num_streams = max(1, cfg.num_workers)
        self.urls = expand_shards(cfg.shards)
        self.fingerprint = shards_fingerprint(self.urls)
        self.survey = None
        if rank == 0:  # early warnings and a bucket estimate, before any step
            self.survey = survey_shard(self.urls[0], cfg.shard_captions)
            for problem in self.survey.warnings(cfg.shard_captions):
                log.warning("data: WARNING: %s", problem)

    def fresh_position(self) -> dict:
        return {"next_step": 0, "rank": self.rank, "num_streams": self.num_streams, "grad_accum": None,
                "generation": 0, "streams": [None] * self.num_streams}

    def start(self, saved: dict, start_step: int, grad_accum: int,
              collate: Collate) -> tuple[IterableDataset, dict]:
        cursors, generation = self._stream_cursors(saved, start_step, grad_accum)
        position = {**self.fresh_position(), "next_step": start_step, "grad_accum": grad_accum,
                    "generation": generation, "streams": [dict(cursor) for cursor in cursors]}
        dataset = ShardBatches(self.urls, self.stages, self.cfg, self.seed, self.rank, grad_accum, start_step,
                               cursors, generation, collate)
        return dataset, position

    def _stream_cursors(self, saved: dict, start_step: int, grad_accum: int) -> tuple[list[dict], int]:
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

    def advance(self, state: dict, position: dict) -> None:
        state["streams"][position["stream"]] = position

    def too_small_skipped(self, stage: Stage) -> int:
        return 0  # counted per sample as the streams read them

    def histogram(self, stage: Stage) -> str:
        sizes, source = read_manifest_sizes(self.urls), ""
        if sizes is None and self.survey is not None and self.survey.sizes:
            sizes = self.survey.sizes
            source = f" (estimated from the first {self.survey.samples} samples of {self.survey.url})"
        if sizes is None:
            return "unknown (no manifest.json from python -m hidream_ft.data.pack, no readable first shard)"
        widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
        assignment = stage_assignment(widths, heights, stage, self.cfg.small_images)
        return histogram_text(bucket_histogram(assignment, list(sizes.values()), stage.buckets)) + source
