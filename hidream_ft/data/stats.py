"""Per-reason counters for data problems and conversions, and rate-limited warnings about them.

Counters are plain ``dict[str, int]`` so they pickle cheaply between DataLoader workers and the main process:
each worker returns the counts it gathered since its previous batch together with that batch.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("hidream_ft.data")

# Every reason a counter can have; ``Pipeline.stats()`` reports all of them (zeros included) so that logged
# keys stay stable over a run. docs/data.md explains each one and its policy.
REASONS = (
    "corrupt_image",
    "converted_16bit",
    "converted_cmyk",
    "converted_palette",
    "alpha_composited",
    "exif_rotated",
    "too_small_upscaled",
    "too_small_skipped",
    "too_large_skipped",
    "caption_missing_empty",
    "caption_missing_skipped",
    "caption_not_utf8",
    "duplicate_key_skipped",
    "metadata_invalid",
    "metadata_unmatched",
    "no_image_skipped",
    "shard_read_error",
    "sample_split",
    "samples_read",
    "shards_read",
    "replacement_used",
    "batch_short",
    "control_missing_skipped",
    "too_many_references",
    "mask_empty_skipped",
)

# The first few events of each reason are logged with file names; the rest only count.
_WARNINGS_PER_REASON = 5
_warned: Counter = Counter()


def record(counts: Counter, reason: str, detail: str = "") -> None:
    """Count one event of ``reason``; log the first few of each reason in this process with ``detail``."""
    if reason not in REASONS:
        raise KeyError(f"unknown data counter {reason!r}")
    counts[reason] += 1
    if detail:
        _warned[reason] += 1
        if _warned[reason] <= _WARNINGS_PER_REASON:
            suffix = " (further ones are only counted)" if _warned[reason] == _WARNINGS_PER_REASON else ""
            log.warning("data %s: %s%s", reason, detail, suffix)


def full_report(counts: Counter) -> dict[str, int]:
    return {reason: int(counts.get(reason, 0)) for reason in REASONS}
