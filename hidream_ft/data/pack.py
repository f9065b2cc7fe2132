"""Pack an image folder into WebDataset tar shards for streaming.

    python -m hidream_ft.data.pack SRC_DIR OUT_DIR --shard-size 1000

What a sample and ``manifest.json`` hold: docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from collections import Counter
from pathlib import Path

import webdataset as wds

from hidream_ft.cli import entry_point, int_at_least
from hidream_ft.config import ConfigError, DataConfig
from hidream_ft.data.buckets import assign_buckets, bucket_histogram, buckets_for_area
from hidream_ft.data.folders import resolved_folder, scan_folder
from hidream_ft.data.images import BadImage, verify_decodes
from hidream_ft.data.shards import MANIFEST_NAME
from hidream_ft.data.stats import record
from hidream_ft.errors import UserError

log = logging.getLogger("hidream_ft.data")

SHARD_PATTERN = "shard-%06d.tar"
_PARTIAL = ".partial"


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + _PARTIAL)
    partial.write_text(text)
    os.replace(partial, path)


class ShardsExist(UserError, FileExistsError):
    """OUT already holds shards and --overwrite was not given."""


def _clear_output(out: Path, overwrite: bool) -> None:
    previous = sorted(out.glob("shard-*.tar*")) + sorted(out.glob(MANIFEST_NAME))
    if previous and not overwrite:
        raise ShardsExist(f"{out} already holds shards ({previous[0].name}, …); pass --overwrite to replace them")
    for path in previous:
        path.unlink()


def pack(
    src: str | Path,
    out: str | Path,
    shard_size: int,
    missing_caption: str = "empty",
    verify: bool = False,
    shuffle_seed: int | None = 0,
    overwrite: bool = False,
    area: int = DataConfig.area,
) -> dict:
    """Pack ``src`` into shards in ``out``; returns the manifest. ``shuffle_seed`` None keeps folder order
    (shuffling spreads similar images over shards, which the streaming reader samples one at a time)."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    counts: Counter = Counter()
    root = resolved_folder(str(src), "SRC")
    items = scan_folder(root, 1, missing_caption, counts)
    if verify:
        verified = []
        for item in items:
            try:
                verify_decodes(item.path, item.path)
                verified.append(item)
            except BadImage as e:
                record(counts, "corrupt_image", str(e))
        items = verified
    if not items:
        raise ConfigError(f"{src}: no usable image to pack")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _clear_output(out, overwrite)

    shards: list[dict] = []
    shard_sizes: Counter = Counter()

    def finish_shard(partial_name: str) -> None:
        final = Path(partial_name.removesuffix(_PARTIAL))
        os.replace(partial_name, final)
        count = sum(shard_sizes.values())
        sizes = {f"{w}x{h}": n for (w, h), n in sorted(shard_sizes.items())}
        shards.append({"file": final.name, "count": count, "bytes": final.stat().st_size, "sizes": sizes})
        shard_sizes.clear()

    # PAX headers keep long and non-ASCII member names intact; a fixed mtime makes shards reproducible.
    with wds.ShardWriter(str(out / (SHARD_PATTERN + _PARTIAL)), maxcount=shard_size, post=finish_shard,
                         verbose=0, mtime=0, format="PAX_FORMAT") as writer:
        for item in items:
            sample = {
                "__key__": item.key,
                Path(item.path).suffix[1:].lower(): Path(item.path).read_bytes(),
                "json": {"width": item.width, "height": item.height, "weight": item.weight,
                         "source": os.path.relpath(item.path, root)},
            }
            if item.caption:
                sample["txt"] = item.caption
            writer.write(sample)
            shard_sizes[(item.width, item.height)] += 1

    sizes = Counter((item.width, item.height) for item in items)
    buckets = tuple(buckets_for_area(area))
    chosen, _ = assign_buckets([w for w, _ in sizes], [h for _, h in sizes], list(buckets))
    histogram = bucket_histogram(chosen, list(sizes.values()), buckets)
    manifest = {
        "format": "hidream-ft shards v1",
        "source": str(src),
        "count": len(items),
        "shards": shards,
        "shard_pattern": f"shard-{{000000..{len(shards) - 1:06d}}}.tar",
        "sizes": {f"{w}x{h}": n for (w, h), n in sorted(sizes.items())},
        "bucket_histogram": {
            "area": area,
            "buckets": {f"{w}x{h}": n for (w, h), n in histogram.items()},
        },
        "scan_counters": dict(sorted(counts.items())),  # images left out or flagged while indexing SRC
    }
    _write_atomically(out / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    return manifest


@entry_point
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m hidream_ft.data.pack", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="image folder (searched recursively)")
    parser.add_argument("out", help="output folder for shard-NNNNNN.tar and manifest.json")
    parser.add_argument("--shard-size", type=int_at_least(1), required=True, help="samples per shard")
    parser.add_argument("--missing-caption", choices=["empty", "skip"], default="empty",
                        help="images without caption: pack them without .txt (default) or leave them out")
    parser.add_argument("--verify", action="store_true", help="decode every image and leave out undecodable ones")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed for the sample order (default 0)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the folder order")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    parser.add_argument("--area", type=int, default=DataConfig.area,
                        help="target area for the bucket histogram in the manifest (default 1024*1024)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = pack(args.src, args.out, args.shard_size, args.missing_caption, args.verify,
                    None if args.no_shuffle else args.seed, args.overwrite, args.area)
    pattern = str(Path(args.out) / manifest["shard_pattern"])
    print(f"packed {manifest['count']} images into {len(manifest['shards'])} shards; in the config:")
    print(f'[data]\nshards = ["{pattern}"]')


if __name__ == "__main__":
    sys.exit(main())
