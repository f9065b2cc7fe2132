"""Which images form which micro-batch, for finite (folder) data: a pure function of seed and position.
Every entry is used exactly once per epoch; the position is tiny and the same on every rank (docs/data.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hidream_ft.data.samples import rng_for


@dataclass(frozen=True)
class PlannedBatch:
    epoch: int
    positions: tuple[int, ...]  # positions in the epoch order: identify the draw, seed its randomness
    items: tuple[int, ...]
    bucket: int  # index into the stage's bucket list


class EpochPlanner:
    """Deterministic micro-batches of one finite dataset; ``position()`` restores it via the constructor."""

    def __init__(self, repeats: np.ndarray, seed: int, epoch: int = 0, cursor: int = 0, pending: list[int] = ()):
        self._entries = np.repeat(np.arange(len(repeats)), repeats)
        self._seed = seed
        self._epoch = epoch
        self._order = self._epoch_order(epoch)
        self._cursor = cursor
        self._restored = list(pending)
        self._queues: dict[int, list[int]] = {}
        self._assignment: np.ndarray | None = None
        self._batch_size = 0

    def _epoch_order(self, epoch: int) -> np.ndarray:
        entropy = rng_for("epoch", self._seed, epoch).getrandbits(128)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
        return self._entries[rng.permutation(len(self._entries))]

    def set_stage(self, assignment: np.ndarray, batch_size: int) -> None:
        """Switch to a stage's bucket assignment (item → bucket index, -1 = not used in this stage) and batch
        size. Queued entries are re-queued under the new buckets in draw order."""
        queued = sorted(self._restored + [p for queue in self._queues.values() for p in queue])
        self._restored = []
        self._assignment = assignment
        self._batch_size = batch_size
        self._queues = {}
        for position in queued:
            bucket = int(assignment[self._order[position]])
            if bucket >= 0:
                self._queues.setdefault(bucket, []).append(position)

    def position(self) -> dict:
        queued = sorted(p for queue in self._queues.values() for p in queue)
        return {"epoch": self._epoch, "cursor": self._cursor, "pending": queued}

    def next_batch(self) -> PlannedBatch:
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

    def _take(self, bucket: int) -> PlannedBatch:
        queue = self._queues[bucket]
        positions, rest = queue[: self._batch_size], queue[self._batch_size :]
        if rest:
            self._queues[bucket] = rest
        else:
            del self._queues[bucket]
        items = tuple(int(self._order[p]) for p in positions)
        return PlannedBatch(self._epoch, tuple(positions), items, bucket)
