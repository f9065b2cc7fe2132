"""A held-out data set in a fixed order: image folders (as ``data.folders``, edit / IP controls and loss masks
included) read once each, centre-cropped at the training run's final resolution, captions without dropout or
tag shuffling, cut into micro-batches of one shape. The same images always give the same batches, whatever
the rank, the world size or the step; ``hidream_ft.inference.heldout`` computes the loss on them."""

from __future__ import annotations

import dataclasses
from collections import Counter

from hidream_ft.config import ConfigError, DataConfig, FolderSource
from hidream_ft.data.buckets import resolve_stages, stage_assignment
from hidream_ft.data.errors import DataError
from hidream_ft.data.folders import scan_folders
from hidream_ft.data.items import FolderItem
from hidream_ft.data.paired import attach_controls, group_by_shape, with_references
from hidream_ft.data.samples import make_sample
from hidream_ft.data.sources import Collate


def heldout_data_config(data: DataConfig, folders: list[FolderSource]) -> DataConfig:
    """``data`` with ``folders`` as its images, made deterministic: the buckets of its last stage (the
    resolution training ends at), centre crops, no caption dropout or tag shuffling, no packing."""
    final = resolve_stages(data, 1)[-1]
    return dataclasses.replace(data, folders=list(folders), shards=[], stages=[], buckets=[list(b) for b in final.buckets],
                               max_tokens=0, crop="center", caption_dropout=0.0, shuffle_tags=False)


class HeldoutBatches:
    """The held-out micro-batches as a sequence: ``len`` batches, each collated by ``collate`` when first
    indexed and then kept, so that a rank decodes only the batches it evaluates, once.

    Items keep the folders' order; a batch holds up to ``batch_size`` items of one bucket and reference shape,
    in that order. Each image counts once (``num_repeats`` does not apply). Images the final stage leaves out
    as too small (``data.small_images = 'skip'``) are not part of the set; one that fails to decode stops the
    run with a :class:`DataError`, since leaving it out would change what the number measures.
    """

    def __init__(self, data: DataConfig, folders: list[FolderSource], batch_size: int, collate: Collate):
        if batch_size < 1:
            raise ConfigError(f"validation.loss_batch_size: must be at least 1, got {batch_size}")
        self.cfg = heldout_data_config(data, folders)
        self.collate = collate
        counts: Counter = Counter()
        items = attach_controls(scan_folders(self.cfg.folders, self.cfg.missing_caption, counts), self.cfg.folders,
                                self.cfg.missing_control, counts)
        stage = resolve_stages(self.cfg, batch_size)[0]
        assignment = stage_assignment([i.width for i in items], [i.height for i in items], stage,
                                      self.cfg.small_images)
        shapes = group_by_shape([stage], [assignment], items)
        self.buckets = shapes.stages[0].buckets
        groups: dict[int, list[int]] = {}
        for index, key in enumerate(shapes.assignments[0].tolist()):
            if key >= 0:
                groups.setdefault(key, []).append(index)
        if not groups:
            raise ConfigError("validation.loss_folders: every image is smaller than its bucket and "
                              "data.small_images = 'skip'; nothing to evaluate")
        self.items: list[FolderItem] = items
        self.plan = [(key, members[start:start + batch_size]) for key, members in groups.items()
                     for start in range(0, len(members), batch_size)]
        self.samples = sum(len(members) for _, members in self.plan)
        self._collated: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int):
        if index not in self._collated:
            key, members = self.plan[index]
            self._collated[index] = self.collate([self._sample(member, self.buckets[key]) for member in members])
        return self._collated[index]

    def _sample(self, index: int, bucket):
        item, counts = self.items[index], Counter()
        sample = make_sample(item.path, item.path, item.key, item.caption, 1.0, bucket, self.cfg, ("heldout",),
                             counts, item.mask)
        sample = with_references(sample, item.controls, bucket, self.cfg, counts)
        if sample is None:
            raise DataError(f"validation.loss_folders: {item.path} (or one of its controls or its mask) cannot be "
                            f"used ({', '.join(sorted(counts))}); fix or remove it")
        return sample
