"""A held-out data set in a fixed order: image folders (as ``data.folders``, edit / IP controls and loss masks
included) or WebDataset shards, every image read once, centre-cropped at the training run's final resolution,
captions without dropout or tag shuffling, cut into micro-batches of one shape. The same images always give the
same batches, whatever the rank, the world size or the step; ``hidream_ft.inference.heldout`` computes the loss
on them."""

from __future__ import annotations

import dataclasses
import tarfile
from collections import Counter
from dataclasses import dataclass

import webdataset as wds

from hidream_ft.config import ConfigError, DataConfig, ValidationConfig
from hidream_ft.data.buckets import resolve_stages, stage_assignment
from hidream_ft.data.errors import DataError
from hidream_ft.data.folders import scan_folders
from hidream_ft.data.items import Controls
from hidream_ft.data.paired import attach_controls, group_by_shape, with_references
from hidream_ft.data.samples import make_sample
from hidream_ft.data.shards import LeftOut, expand_shards, shard_entry
from hidream_ft.data.sources import Collate
from hidream_ft.data.stats import record


@dataclass(frozen=True)
class HeldoutItem:
    """One held-out image before decoding, from a folder or a shard."""

    key: str  # seeds its noise: the folder item's key, or the shard sample's key
    source: str | bytes  # a file path, or the encoded image
    name: str  # for messages
    caption: str
    width: int
    height: int
    controls: Controls | None = None
    mask: str | None = None


def heldout_data_config(data: DataConfig, validation: ValidationConfig) -> DataConfig:
    """``data`` reading the held-out folders or shards, made deterministic: the buckets of its last stage (the
    resolution training ends at), centre crops, no caption dropout or tag shuffling, no packing."""
    final = resolve_stages(data, 1)[-1]
    return dataclasses.replace(data, folders=list(validation.loss_folders), shards=list(validation.loss_shards),
                               stages=[], buckets=[list(b) for b in final.buckets], max_tokens=0, crop="center",
                               caption_dropout=0.0, shuffle_tags=False)


def folder_items(cfg: DataConfig, counts: Counter) -> list[HeldoutItem]:
    items = attach_controls(scan_folders(cfg.folders, cfg.missing_caption, counts), cfg.folders,
                            cfg.missing_control, counts)
    return [HeldoutItem(item.key, item.path, item.path, item.caption, item.width, item.height, item.controls,
                        item.mask) for item in items]


def shard_items(cfg: DataConfig, counts: Counter) -> list[HeldoutItem]:
    """Every sample of every shard, in order, read once (encoded images stay in memory); samples the shard
    policies leave out are counted and left out here too."""
    items = []
    for url in expand_shards(cfg.shards):
        try:
            for raw in wds.tarfile_samples([{"url": url}]):
                try:
                    entry = shard_entry(raw, cfg, counts)
                except LeftOut as e:
                    record(counts, e.reason, e.detail)
                    continue
                items.append(HeldoutItem(entry.key, entry.image, entry.name, entry.caption, entry.width,
                                         entry.height, entry.controls))
        except (OSError, ValueError, tarfile.TarError) as e:
            raise DataError(f"validation.loss_shards: cannot read {url}: {e}") from None
    if not items:
        raise ConfigError(f"validation.loss_shards: no usable sample in {', '.join(cfg.shards)}")
    return items


class HeldoutBatches:
    """The held-out micro-batches as a sequence: ``len`` batches, each collated by ``collate`` when first
    indexed and then kept, so that a rank decodes only the batches it evaluates, once.

    Items keep the folders' (or shards') order; a batch holds up to ``validation.loss_batch_size`` items of one
    bucket and reference shape, in that order. Each image counts once (``num_repeats`` does not apply). Images
    the final stage leaves out as too small (``data.small_images = 'skip'``) are not part of the set; one that
    fails to decode stops the run with a :class:`DataError`, since leaving it out would change what the number
    measures.
    """

    def __init__(self, data: DataConfig, validation: ValidationConfig, collate: Collate):
        if not (validation.loss_folders or validation.loss_shards):
            raise ConfigError("validation: no held-out images; set validation.loss_folders or validation.loss_shards")
        self.cfg = heldout_data_config(data, validation)
        self.collate = collate
        counts: Counter = Counter()
        items = folder_items(self.cfg, counts) if self.cfg.folders else shard_items(self.cfg, counts)
        stage = resolve_stages(self.cfg, validation.loss_batch_size)[0]
        assignment = stage_assignment([i.width for i in items], [i.height for i in items], stage,
                                      self.cfg.small_images)
        shapes = group_by_shape([stage], [assignment], items)
        self.buckets = shapes.stages[0].buckets
        groups: dict[int, list[int]] = {}
        for index, key in enumerate(shapes.assignments[0].tolist()):
            if key >= 0:
                groups.setdefault(key, []).append(index)
        if not groups:
            raise ConfigError("validation: every held-out image is smaller than its bucket and "
                              "data.small_images = 'skip'; nothing to evaluate")
        self.items = items
        size = validation.loss_batch_size
        self.plan = [(key, members[start:start + size]) for key, members in groups.items()
                     for start in range(0, len(members), size)]
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
        sample = make_sample(item.source, item.name, item.key, item.caption, 1.0, bucket, self.cfg, ("heldout",),
                             counts, item.mask)
        sample = with_references(sample, item.controls, bucket, self.cfg, counts)
        if sample is None:
            raise DataError(f"validation: held-out image {item.name} (or one of its controls or its mask) cannot "
                            f"be used ({', '.join(sorted(counts))}); fix or remove it")
        return sample
