"""Which images form which micro-batch, for finite (folder) data: a pure function of seed and position.
Every entry is used exactly once per epoch; the position is tiny and the same on every rank (docs/data.md).
Micro-batches are either a fixed number of images of one bucket, or images of any buckets within a token
budget (packing)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hidream_ft.data.samples import rng_for


@dataclass(frozen=True)
class PlannedBatch:
    epoch: int
    positions: tuple[int, ...]  # positions in the epoch order: identify the draw, seed its randomness
    items: tuple[int, ...]
    buckets: tuple[int, ...]  # each item's index into the stage's bucket list


class PackedSamples(list):
    """The samples of a token-budget micro-batch, and the length of the packed row they go into: what the data
    pipeline hands a collate function instead of a plain list when the stage packs."""

    def __init__(self, samples, row_tokens: int):
        super().__init__(samples)
        self.row_tokens = row_tokens


@dataclass(frozen=True)
class Mixing:
    """Entries of a second dataset mixed into every epoch (``data.regularization``): ``per_epoch`` of them,
    taken in turn from a stream of seeded passes over ``entries`` (item indices, repeats included), so that
    each of its items is used as often as the others however the epochs cut the stream."""

    entries: np.ndarray
    per_epoch: int

    def draw(self, seed: int, epoch: int) -> np.ndarray:
        """The mixed entries of ``epoch``: positions [epoch·per_epoch, (epoch + 1)·per_epoch) of the stream."""
        first, count = epoch * self.per_epoch, len(self.entries)
        passes = range(first // count, -(-(first + self.per_epoch) // count))  # the passes the range touches
        stream = np.concatenate([self.entries[:0], *(self.entries[_permutation(count, "mixed pass", seed, p)]
                                                     for p in passes)])
        start = first - passes.start * count
        return stream[start:start + self.per_epoch]


def mixed_count(entries: int, ratio: float) -> int:
    """How many mixed entries make them ``ratio`` of an epoch of ``entries`` others (rounded)."""
    return round(entries * ratio / (1 - ratio))


def _permutation(length: int, *parts) -> np.ndarray:
    entropy = rng_for(*parts).getrandbits(128)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy))).permutation(length)


_ANY_BUCKET = -1  # the one queue of a token-budget stage, whose micro-batches mix buckets


class EpochPlanner:
    """Deterministic micro-batches of one finite dataset; ``position()`` restores it via the constructor."""

    def __init__(self, repeats: np.ndarray, seed: int, epoch: int = 0, cursor: int = 0, pending: list[int] = (),
                 mixing: Mixing | None = None):
        self._entries = np.repeat(np.arange(len(repeats)), repeats)
        self._seed = seed
        self._mixing = mixing
        self._epoch = epoch
        self._order = self._epoch_order(epoch)
        self._cursor = cursor
        self._restored = list(pending)
        self._queues: dict[int, list[int]] = {}
        self._assignment: np.ndarray | None = None
        self._batch_size = 0
        self._costs: np.ndarray | None = None
        self._max_tokens = 0

    def _epoch_order(self, epoch: int) -> np.ndarray:
        entries = self._entries
        if self._mixing is not None:
            entries = np.concatenate([entries, self._mixing.draw(self._seed, epoch)])
        return entries[_permutation(len(entries), "epoch", self._seed, epoch)]

    def set_stage(self, assignment: np.ndarray, batch_size: int, costs: np.ndarray | None = None,
                  max_tokens: int = 0) -> None:
        """Switch to a stage's bucket assignment (item → bucket index, -1 = not used in this stage) and batch
        size; or, with ``max_tokens``, to micro-batches of consecutive entries whose ``costs`` (item → tokens)
        sum to at most ``max_tokens``. Queued entries are re-queued under the new buckets in draw order."""
        queued = sorted(self._restored + [p for queue in self._queues.values() for p in queue])
        self._restored = []
        self._assignment = assignment
        self._batch_size = batch_size
        self._costs, self._max_tokens = costs, max_tokens
        self._queues = {}
        for position in queued:
            bucket = int(assignment[self._order[position]])
            if bucket >= 0:
                self._queues.setdefault(_ANY_BUCKET if max_tokens else bucket, []).append(position)

    def position(self) -> dict:
        queued = sorted(p for queue in self._queues.values() for p in queue)
        return {"epoch": self._epoch, "cursor": self._cursor, "pending": queued}

    def next_batch(self) -> PlannedBatch:
        if self._max_tokens:
            return self._next_within_budget()
        while True:
            full = [b for b, queue in self._queues.items() if len(queue) >= self._batch_size]
            if full:  # only after a stage switch can queues start out full
                return self._take(min(full, key=lambda b: self._queues[b][0]))
            while self._cursor < len(self._order):
                position = self._cursor
                self._cursor += 1
                bucket = int(self._assignment[self._order[position]])
                if bucket < 0:
                    continue
                queue = self._queues.setdefault(bucket, [])
                queue.append(position)
                if len(queue) >= self._batch_size:
                    return self._take(bucket)
            if self._queues:  # the epoch's entries are drawn: the oldest queue leaves, possibly short
                return self._take(min(self._queues, key=lambda b: self._queues[b][0]))
            self._epoch += 1
            self._order = self._epoch_order(self._epoch)
            self._cursor = 0

    def _next_within_budget(self) -> PlannedBatch:
        """Entries in draw order until the next one would exceed the budget; that one is kept for the next
        micro-batch. The last micro-batch of an epoch may be short, as with a batch size."""
        queue = self._queues.pop(_ANY_BUCKET, [])
        while True:
            taken, used = [], 0
            while queue or self._cursor < len(self._order):
                if not queue:
                    position = self._cursor
                    self._cursor += 1
                    if self._assignment[self._order[position]] >= 0:
                        queue.append(position)
                    continue
                cost = int(self._costs[self._order[queue[0]]])
                if taken and used + cost > self._max_tokens:
                    break
                taken.append(queue.pop(0))
                used += cost
            if taken:
                if queue:
                    self._queues[_ANY_BUCKET] = queue
                return self._planned(taken)
            self._epoch += 1
            self._order = self._epoch_order(self._epoch)
            self._cursor = 0

    def _take(self, bucket: int) -> PlannedBatch:
        queue = self._queues[bucket]
        positions, rest = queue[: self._batch_size], queue[self._batch_size :]
        if rest:
            self._queues[bucket] = rest
        else:
            del self._queues[bucket]
        return self._planned(positions)

    def _planned(self, positions: list[int]) -> PlannedBatch:
        items = tuple(int(self._order[p]) for p in positions)
        buckets = tuple(int(self._assignment[item]) for item in items)
        return PlannedBatch(self._epoch, tuple(positions), items, buckets)
