"""Caption decoding and the per-sample caption transforms: tag shuffling, trigger prefix, CFG dropout."""

from __future__ import annotations

import random
from collections import Counter

from hidream_ft.config import DataConfig
from hidream_ft.data.stats import record
from hidream_ft.model.layout import EMPTY_PROMPT


def decode_caption(data: bytes, counts: Counter, source: str) -> str:
    """UTF-8 (a leading BOM is dropped); undecodable bytes become U+FFFD and are counted, not fatal."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        record(counts, "caption_not_utf8", f"{source}: not UTF-8, undecodable bytes replaced")
        text = data.decode("utf-8-sig", errors="replace")
    return text.strip()


def shuffle_tags(caption: str, keep: int, rng: random.Random) -> str:
    """Shuffle comma-separated tags, keeping the first ``keep`` in place (e.g. a subject tag)."""
    tags = [tag.strip() for tag in caption.split(",")]
    tags = [tag for tag in tags if tag]
    kept, rest = tags[:keep], tags[keep:]
    rng.shuffle(rest)
    return ", ".join(kept + rest)


def build_caption(caption: str, cfg: DataConfig, rng: random.Random) -> str:
    """The caption a training sample gets. Dropout replaces everything, trigger included, with the empty
    prompt so that the model learns the unconditional branch it is sampled with."""
    # Drawn first and always, so the dropout setting does not change which tag order a sample gets.
    dropped = rng.random() < cfg.caption_dropout
    if cfg.shuffle_tags:
        caption = shuffle_tags(caption, cfg.keep_tags, rng)
    if dropped:
        return EMPTY_PROMPT
    if cfg.trigger and not caption.startswith(cfg.trigger):
        caption = f"{cfg.trigger}, {caption}" if caption else cfg.trigger
    return caption or EMPTY_PROMPT
