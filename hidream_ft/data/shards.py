"""Streaming micro-batches from WebDataset tar shards (local paths, brace patterns or any URL WebDataset opens).

Each (rank, stream) pair reads an endless, seeded sequence of *rounds*: round k is one shard drawn with
replacement by ``webdataset.ResampledShards`` and read through a seeded ``webdataset.shuffle`` buffer. So no
rank ever runs out and none depends on how many shards there are (the classic WebDataset traps: "fewer shards
than workers" errors, and uneven shard counts per rank hanging the last step of an epoch).

Samples wait in per-bucket queues as raw bytes (decoded only when their micro-batch leaves) until a queue
holds a micro-batch; a sample still queued at the end of the round after its own leaves in a possibly smaller
micro-batch. A stream's position is therefore (round, samples drawn in it, queued samples as (round, offset)),
and a resume re-reads at most the previous and the current shard to restore it exactly.

Stream ``s`` produces every num_streams-th micro-batch of its rank, starting at ``s``; with DataLoader workers
taking turns in order, that fixes which step each micro-batch belongs to, hence its resolution stage.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from hidream_ft.config import DataConfig
from hidream_ft.data.buckets import Stage, assign_buckets, stage_at
from hidream_ft.data.captions import decode_caption
from hidream_ft.data.images import IMAGE_EXTENSIONS, BadImage, probe_size
from hidream_ft.data.paired import BadControls, Controls, reference_sizes, shard_controls, with_references
from hidream_ft.data.samples import Sample, make_sample, rng_for
from hidream_ft.data.stats import record

# Rounds in a row without a single readable sample before a stream stops with an error instead of spinning.
_EMPTY_ROUNDS_LIMIT = 16


def expand_shards(patterns: list[str]) -> list[str]:
    """Brace patterns and ``::``-separated lists expanded the way WebDataset expands them."""
    return [url for pattern in patterns for url in wds.shardlists.expand_urls(pattern)]


def shards_fingerprint(urls: list[str]) -> str:
    return hashlib.blake2b("\n".join(urls).encode(), digest_size=12).hexdigest()


def fresh_cursor(stream: int, first_output: int, num_streams: int) -> dict:
    """Position of a stream that has read nothing; its first micro-batch is its first output ≥ ``first_output``."""
    return {
        "stream": stream,
        "next_output": first_output + (stream - first_output) % num_streams,
        "round": 0,
        "offset": 0,
        "pending": [],
    }


def _sample_metadata(data: bytes | None, counts: Counter, name: str) -> dict:
    """The sample's ``.json`` (size, weight) or {} when absent or not a JSON object."""
    if data is None:
        return {}
    try:
        meta = json.loads(data)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        record(counts, "metadata_invalid", f"{name}.json: not a JSON object; ignored")
        return {}
    return meta


@dataclass
class _Queued:
    round: int
    offset: int
    key: str
    name: str  # for messages: shard URL and key
    image: bytes  # encoded; decoded when its micro-batch leaves
    caption: str
    weight: float
    width: int
    height: int
    controls: Controls | None = None  # edit / IP: the ref0, ref1, … members
    bucket: int = -1
    group: tuple = ()  # (bucket, reference sizes): the samples of one micro-batch share it


@dataclass
class StreamReader:
    """One stream of one rank: turns shards into ``(samples of a micro-batch, position after it)`` pairs."""

    urls: list[str]
    stages: list[Stage]
    cfg: DataConfig
    seed: int
    generation: int  # 0 for a fresh run; the resume step when positions could not be restored exactly
    rank: int
    num_streams: int
    grad_accum: int
    cursor: dict
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.stream = self.cursor["stream"]
        self.next_output = self.cursor["next_output"]
        self.stage = self._stage_of_next_output()
        self.queued: list[_Queued] = []  # in draw order
        self.round, self.drawn = self.cursor["round"], self.cursor["offset"]

    def _stage_of_next_output(self) -> Stage:
        return stage_at(self.stages, self.next_output // self.grad_accum)

    def _seed_parts(self, *parts) -> tuple:
        return (self.seed, self.generation, self.rank, self.stream, *parts)

    def _on_read_error(self, error: Exception) -> bool:
        record(self.counts, "shard_read_error", f"{type(error).__name__}: {error}")
        return True  # go on with the next sample or shard

    def _rounds(self, first_round: int):
        draws = wds.ResampledShards(
            self.urls,
            seed=rng_for("shards", *self._seed_parts()).getrandbits(31),
            deterministic=True,
            worker_seed=lambda: 0,  # the seed above already identifies rank and stream
        )
        urls = (draw["url"] for draw in itertools.islice(iter(draws), first_round, None))
        return zip(itertools.count(first_round), urls)

    def _round_samples(self, round_index: int, url: str):
        samples = wds.tarfile_samples([{"url": url}], handler=self._on_read_error)
        rng = rng_for("shuffle", *self._seed_parts(round_index))
        return wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=rng)(samples)

    def batches(self):
        """Endless ``(list[Sample], position)`` pairs; ``position`` restores this stream via ``cursor``."""
        restore = {tuple(p) for p in self.cursor["pending"]}
        resume_at = (self.cursor["round"], self.cursor["offset"])
        empty_rounds = 0
        for round_index, url in self._rounds(min([resume_at[0]] + [r for r, _ in restore])):
            self.round, self.drawn = round_index, 0
            for offset, raw in enumerate(self._round_samples(round_index, url)):
                self.drawn = offset + 1
                if (round_index, offset) < resume_at:  # read before the resume: only restore the queue
                    if (round_index, offset) in restore:
                        self._enqueue(raw, round_index, offset, Counter())  # its events were counted before
                    continue
                self._enqueue(raw, round_index, offset, self.counts)
                yield from self._leave_full()
            yield from self._leave_older_than(round_index)
            empty_rounds = 0 if self.drawn else empty_rounds + 1
            if empty_rounds >= _EMPTY_ROUNDS_LIMIT:
                raise RuntimeError(
                    f"data.shards: {empty_rounds} shards in a row gave no readable sample (last: {url}); "
                    "see the shard_read_error warnings"
                )

    def _enqueue(self, raw: dict, round_index: int, offset: int, counts: Counter) -> None:
        name = f"{raw.get('__url__')}:{raw.get('__key__')}"
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if image_ext is None:
            record(counts, "no_image_skipped", f"{name}: no .{'/.'.join(IMAGE_EXTENSIONS)} member")
            return
        meta = _sample_metadata(raw.get("json"), counts, name)
        width, height = meta.get("width"), meta.get("height")
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
            try:  # shards not written by our packer: read the size from the image header
                width, height = probe_size(raw[image_ext], name)
            except BadImage as e:
                record(counts, "corrupt_image", str(e))
                return
        caption = decode_caption(raw["txt"], counts, f"{name}.txt") if "txt" in raw else ""
        if not caption:
            if self.cfg.missing_caption == "skip":
                record(counts, "caption_missing_skipped", f"{name}: no caption (missing_caption = 'skip')")
                return
            record(counts, "caption_missing_empty", f"{name}: no caption, training it with the empty prompt")
        weight = meta.get("weight", 1.0)
        weight = float(weight) if isinstance(weight, (int, float)) and weight >= 0 else 1.0
        try:
            controls = shard_controls(raw, meta, name)
        except BadControls as e:
            record(counts, e.reason, str(e))
            return
        entry = _Queued(round_index, offset, raw["__key__"], name, raw[image_ext], caption, weight, width, height,
                        controls)
        if self._assign(entry, counts):
            self.queued.append(entry)

    def _assign(self, entry: _Queued, counts: Counter) -> bool:
        """Bucket ``entry`` under the current stage; False when the stage skips it as too small."""
        index, upscale = assign_buckets([entry.width], [entry.height], list(self.stage.buckets))
        if upscale[0] and self.cfg.small_images == "skip":
            record(counts, "too_small_skipped")
            return False
        entry.bucket = int(index[0])
        bucket = self.stage.buckets[entry.bucket]
        entry.group = (entry.bucket, () if entry.controls is None else reference_sizes(entry.controls.sizes, bucket))
        return True

    def _leave_full(self):
        while True:
            sizes = Counter(entry.group for entry in self.queued)
            full = next((e.group for e in self.queued if sizes[e.group] >= self.stage.batch_size), None)
            if full is None:
                return
            members = [e for e in self.queued if e.group == full][: self.stage.batch_size]
            samples = self._decode(members)
            if None not in samples:
                self._remove(members)
                yield self._emit(samples)
            else:  # drop the undecodable ones and wait for more samples to fill the micro-batch
                self._remove([e for e, s in zip(members, samples) if s is None])

    def _leave_older_than(self, round_index: int):
        while True:
            oldest = next((e for e in self.queued if e.round < round_index), None)
            if oldest is None:
                return
            members = [e for e in self.queued if e.group == oldest.group][: self.stage.batch_size]
            self._remove(members)
            samples = [s for s in self._decode(members) if s is not None]
            if len(samples) < len(members):
                record(self.counts, "batch_short")
            if samples:
                yield self._emit(samples)

    def _decode(self, members: list[_Queued]) -> list[Sample | None]:
        bucket = self.stage.buckets[members[0].bucket]
        return [
            with_references(make_sample(e.image, e.name, e.key, e.caption, e.weight, bucket, self.cfg,
                                        self._seed_parts(e.round, e.offset), self.counts),
                            e.controls, bucket, self.cfg, self.counts)
            for e in members
        ]

    def _remove(self, members: list[_Queued]) -> None:
        gone = {id(e) for e in members}
        self.queued = [e for e in self.queued if id(e) not in gone]

    def _emit(self, samples: list[Sample]) -> tuple[list[Sample], dict]:
        self.next_output += self.num_streams
        stage = self._stage_of_next_output()
        if stage is not self.stage:
            self.stage = stage
            self.queued = [e for e in self.queued if self._assign(e, self.counts)]
        position = {
            "stream": self.stream,
            "next_output": self.next_output,
            "round": self.round,
            "offset": self.drawn,
            "pending": [[e.round, e.offset] for e in self.queued],
        }
        return samples, position


MANIFEST_NAME = "manifest.json"


def _local_path(url: str) -> Path | None:
    if url.startswith("file:"):
        return Path(url.removeprefix("file:"))
    return None if "://" in url or url.startswith("pipe:") else Path(url)


def read_manifest_sizes(urls: list[str]) -> dict[tuple[int, int], int] | None:
    """Image size histogram of the given shards from the packer's manifests, or None when a shard is remote
    or has no manifest entry (the histogram is then only known after reading everything)."""
    manifests: dict[Path, dict] = {}
    sizes: Counter = Counter()
    for url in urls:
        path = _local_path(url)
        manifest = path.parent / MANIFEST_NAME if path is not None else None
        if manifest is None or not manifest.is_file():
            return None
        if manifest not in manifests:
            listed = json.loads(manifest.read_text())["shards"]
            manifests[manifest] = {shard["file"]: shard["sizes"] for shard in listed}
        if path.name not in manifests[manifest]:
            return None
        for size, count in manifests[manifest][path.name].items():
            width, height = map(int, size.split("x"))
            sizes[(width, height)] += count
    return dict(sizes)
