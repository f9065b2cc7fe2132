"""Streaming micro-batches from WebDataset tar shards (local paths, brace patterns or any URL WebDataset opens):
endless seeded streams of shards drawn with replacement, with an exactly restorable position (docs/data.md)."""

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
from hidream_ft.data.errors import DataError
from hidream_ft.data.images import IMAGE_EXTENSIONS, BadImage, probe_size
from hidream_ft.data.items import Controls
from hidream_ft.data.paired import BadControls, reference_sizes, shard_controls, with_references
from hidream_ft.data.samples import Sample, make_sample, rng_for
from hidream_ft.data.stats import record

# Rounds in a row without a single readable sample before a stream stops with an error instead of spinning.
_EMPTY_ROUNDS_LIMIT = 16
# Samples in a row that a stream reads and leaves out (by a policy, or undecodable) before it stops with an
# error: far beyond any run of bad luck in data that has usable samples at all, and seconds of reading.
_LEFT_OUT_LIMIT = 1000
# What to change when every sample is left out for a reason.
_FIXES = {
    "too_small_skipped": "the images are smaller than their buckets; lower data.area (or the stage's area or "
                         "buckets) or set data.small_images = 'upscale'",
    "caption_missing_skipped": "no sample has a caption where data.shard_captions looks ({sources}); name the "
                               "member or .json field that holds them, or set data.missing_caption = 'empty'",
    "no_image_skipped": "no sample has a ." + "/.".join(IMAGE_EXTENSIONS) + " member (see the sample_split "
                        "warnings if the tar's members are not grouped by sample)",
    "corrupt_image": "the images cannot be decoded",
}
# Samples read from the first shard at start, to warn about captions and tar layout and estimate buckets.
SURVEY_SAMPLES = 200


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
    """The sample's ``.json`` (weight, task, caption fields) or {} when absent or not a JSON object."""
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


def shard_caption(raw: dict, meta: dict, sources: list[str], counts: Counter, name: str) -> str:
    """The first non-blank caption of ``sources`` (``data.shard_captions``): member suffixes such as ``txt``,
    or ``json:FIELD`` for a field of the sample's ``.json``; "" when none has one."""
    for source in sources:
        if source.startswith("json:"):
            text = meta.get(source.removeprefix("json:"))
            caption = text.strip() if isinstance(text, str) else ""
        else:
            suffix = source.lstrip(".")
            caption = decode_caption(raw[suffix], counts, f"{name}.{suffix}") if suffix in raw else ""
        if caption:
            return caption
    return ""


def _image_suffix(raw: dict) -> str | None:
    return next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)


def _split_warning(url: str, what: str) -> str:
    return (f"{url}: {what}: the tar's members are not grouped by sample (a plain `tar cf` "
            "of a folder), so images, captions and .json are read apart; rebuild it with `tar --sort=name -cf "
            "SHARD.tar -C FOLDER .` or `python -m hidream_ft.data.pack`")


class LeftOut(Exception):
    """A shard sample that a policy or its own data leaves out: the counter ``reason`` and a message."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class ShardEntry:
    """A shard sample read but not decoded: what bucketing and decoding need."""

    key: str
    name: str  # for messages: shard URL and key
    image: bytes  # encoded; decoded when its micro-batch leaves
    caption: str
    weight: float
    width: int
    height: int
    controls: Controls | None = None  # edit / IP: the ref0, ref1, … members
    round: int = 0  # the stream's position of the sample: shard draw and offset in it
    offset: int = 0
    bucket: int = -1
    group: tuple = ()  # (bucket, reference sizes): the samples of one micro-batch share it


def shard_entry(raw: dict, cfg: DataConfig, counts: Counter, round_index: int = 0, offset: int = 0) -> ShardEntry:
    """The :class:`ShardEntry` of a WebDataset sample (its members by suffix), or :class:`LeftOut`: no image,
    an undecodable image header, no caption under ``missing_caption = 'skip'``, or bad reference members."""
    name = f"{raw.get('__url__')}:{raw.get('__key__')}"
    image_ext = _image_suffix(raw)
    if image_ext is None:
        raise LeftOut("no_image_skipped", f"{name}: no .{'/.'.join(IMAGE_EXTENSIONS)} member")
    meta = _sample_metadata(raw.get("json"), counts, name)
    try:  # from the header, not the .json: img2dataset's sizes are before EXIF rotation
        width, height = probe_size(raw[image_ext], name)
    except BadImage as e:
        raise LeftOut("corrupt_image", str(e)) from None
    caption = shard_caption(raw, meta, cfg.shard_captions, counts, name)
    if not caption:
        if cfg.missing_caption == "skip":
            raise LeftOut("caption_missing_skipped", f"{name}: no caption (missing_caption = 'skip')")
        record(counts, "caption_missing_empty", f"{name}: no caption, training it with the empty prompt")
    weight = meta.get("weight", 1.0)
    weight = float(weight) if isinstance(weight, (int, float)) and weight >= 0 else 1.0
    try:
        controls = shard_controls(raw, meta, name)
    except BadControls as e:
        raise LeftOut(e.reason, str(e)) from None
    return ShardEntry(raw["__key__"], name, raw[image_ext], caption, weight, width, height, controls, round_index,
                      offset)


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
        self.queued: list[ShardEntry] = []  # in draw order
        self.round, self.drawn = self.cursor["round"], self.cursor["offset"]
        self.round_keys: set[str] = set()  # keys read in the current shard, to notice split samples
        self.left_out: Counter = Counter()  # reasons of the samples left out since the last one used

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
            self.round_keys.clear()
            if (round_index, 0) >= resume_at:
                record(self.counts, "shards_read")
            for offset, raw in enumerate(self._round_samples(round_index, url)):
                self.drawn = offset + 1
                if (round_index, offset) < resume_at:  # read before the resume: only restore the queue
                    self._note_key(raw, Counter())
                    if (round_index, offset) in restore:
                        self._enqueue(raw, round_index, offset, Counter())  # its events were counted before
                    continue
                record(self.counts, "samples_read")
                self._note_key(raw, self.counts)
                self._enqueue(raw, round_index, offset, self.counts)
                yield from self._leave_full()
            yield from self._leave_older_than(round_index)
            empty_rounds = 0 if self.drawn else empty_rounds + 1
            if empty_rounds >= _EMPTY_ROUNDS_LIMIT:
                raise DataError(
                    f"data.shards: {empty_rounds} shards in a row gave no readable sample (last: {url}); "
                    "see the shard_read_error warnings"
                )

    def _note_key(self, raw: dict, counts: Counter) -> None:
        """Count a sample whose key was read before in this shard: WebDataset groups consecutive members only."""
        key = raw["__key__"]
        if key in self.round_keys:
            record(counts, "sample_split", _split_warning(raw.get("__url__"), f"key {key!r} appears twice"))
        self.round_keys.add(key)

    def _leave_out(self, counts: Counter, reason: str, detail: str = "") -> None:
        record(counts, reason, detail)
        self._left_out(reason)

    def _left_out(self, reason: str) -> None:
        """Note one more sample left out since the last one used; stop the run when that is all it reads."""
        self.left_out[reason] += 1
        if self.left_out.total() >= _LEFT_OUT_LIMIT:
            reasons = ", ".join(f"{reason} {count}" for reason, count in self.left_out.most_common())
            fix = _FIXES.get(self.left_out.most_common(1)[0][0], "see the data warnings above")
            raise DataError(
                f"data.shards: the last {self.left_out.total()} samples read were all left out and none was "
                f"used ({reasons}): {fix.format(sources=', '.join(self.cfg.shard_captions))}"
            )

    def _enqueue(self, raw: dict, round_index: int, offset: int, counts: Counter) -> None:
        try:
            entry = shard_entry(raw, self.cfg, counts, round_index, offset)
        except LeftOut as e:
            self._leave_out(counts, e.reason, e.detail)
            return
        if self._assign(entry, counts):
            self.queued.append(entry)

    def _assign(self, entry: ShardEntry, counts: Counter) -> bool:
        """Bucket ``entry`` under the current stage; False when the stage skips it as too small."""
        index, upscale = assign_buckets([entry.width], [entry.height], list(self.stage.buckets))
        if upscale[0] and self.cfg.small_images == "skip":
            bucket = self.stage.buckets[int(index[0])]
            self._leave_out(counts, "too_small_skipped", f"{entry.name}: {entry.width}×{entry.height} is smaller "
                            f"than its bucket {bucket[0]}×{bucket[1]} (small_images = 'skip')")
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

    def _decode(self, members: list[ShardEntry]) -> list[Sample | None]:
        bucket = self.stage.buckets[members[0].bucket]
        samples = [
            with_references(make_sample(e.image, e.name, e.key, e.caption, e.weight, bucket, self.cfg,
                                        self._seed_parts(e.round, e.offset), self.counts),
                            e.controls, bucket, self.cfg, self.counts)
            for e in members
        ]
        for sample in samples:
            if sample is None:
                self._left_out("corrupt_image")
            else:
                self.left_out.clear()
        return samples

    def _remove(self, members: list[ShardEntry]) -> None:
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


def local_shard_path(url: str) -> Path | None:
    if url.startswith("file:"):
        return Path(url.removeprefix("file:"))
    return None if "://" in url or url.startswith("pipe:") else Path(url)


def read_manifest_sizes(urls: list[str]) -> dict[tuple[int, int], int] | None:
    """Image size histogram of the given shards from the packer's manifests, or None when a shard is remote
    or has no manifest entry (the histogram is then only known after reading everything)."""
    manifests: dict[Path, dict] = {}
    sizes: Counter = Counter()
    for url in urls:
        path = local_shard_path(url)
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


@dataclass
class ShardSurvey:
    """The first samples of one shard, read at start: to warn early about missing captions and split samples,
    and to estimate the bucket histogram of shards without a manifest."""

    url: str
    samples: int = 0
    captioned: int = 0
    split: int = 0  # samples whose key was read before in the shard
    suffixes: Counter = field(default_factory=Counter)  # member suffixes seen, for the caption warning
    sizes: Counter = field(default_factory=Counter)  # displayed (width, height) of the readable images

    def warnings(self, caption_sources: list[str]) -> list[str]:
        found = ", ".join(sorted(self.suffixes))
        problems = []
        if self.samples and self.captioned * 2 < self.samples:
            problems.append(
                f"{self.samples - self.captioned} of the first {self.samples} samples of {self.url} have no caption "
                f"where data.shard_captions looks ({', '.join(caption_sources)}; members found: {found}); they train "
                "with the empty prompt (missing_caption = 'empty') or are left out ('skip'): set "
                "data.shard_captions to the member or .json field that holds the captions"
            )
        if self.split:
            problems.append(_split_warning(self.url, f"{self.split} of the first {self.samples} samples repeat "
                                                     "an earlier key"))
        return problems


def survey_shard(url: str, caption_sources: list[str], limit: int = SURVEY_SAMPLES) -> ShardSurvey:
    """Read up to ``limit`` samples of ``url`` (fewer, without an error, when it cannot be read)."""
    survey = ShardSurvey(url)
    keys: set[str] = set()
    quiet: Counter = Counter()  # the training streams count and report these samples' events
    for raw in itertools.islice(wds.tarfile_samples([{"url": url}], handler=wds.ignore_and_stop), limit):
        survey.samples += 1
        survey.split += raw["__key__"] in keys
        keys.add(raw["__key__"])
        survey.suffixes.update(key for key in raw if not key.startswith("__"))
        name = f"{url}:{raw['__key__']}"
        survey.captioned += bool(shard_caption(raw, _sample_metadata(raw.get("json"), quiet, name),
                                               caption_sources, quiet, name))
        image_ext = _image_suffix(raw)
        if image_ext is not None:
            try:
                survey.sizes[probe_size(raw[image_ext], name)] += 1
            except BadImage:
                pass  # counted when a stream reads it
    return survey
