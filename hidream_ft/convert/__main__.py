"""Convert HiDream-O1 training outputs and LoRAs for inference tools.

    python -m hidream_ft.convert export SOURCE --to {peft,comfyui,kohya,musubi} --out PATH [--base DIR] [--ema]
    python -m hidream_ft.convert inspect SOURCE
    python -m hidream_ft.convert merge SOURCE[:WEIGHT] ... --out PATH [--layout hf|comfyui] [--base DIR] [--ema]
    python -m hidream_ft.convert stack SOURCE:WEIGHT SOURCE:WEIGHT ... --to FORMAT --out PATH

SOURCE is a run directory, a checkpoints/step-N/ folder, a PEFT adapter directory, or a .safetensors LoRA in
any known key style (peft, comfyui, kohya, musubi, ai-toolkit, onetrainer, diffsynth — detected
automatically). `merge` also takes full fine-tunes (a full-mode step-N/ folder or a plain state-dict file).
`--ema` reads the averaged weights of a run trained with ema.enabled instead of its final ones.
See docs/export.md.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from hidream_ft.cli import entry_point
from hidream_ft.convert.merge import DEFAULT_SHARD_BYTES, LAYOUTS, base_weights, merge_checkpoint, weight_shapes
from hidream_ft.convert.sources import FullWeights, load_adapter, load_source
from hidream_ft.lora import (
    WRITABLE_STYLES, ConvertError, check_fits, describe, parse_lora_keys, parse_lora_spec, stack_adapters, write_lora,
)
from hidream_ft.lora.formats import META
from hidream_ft.model.dtypes import TORCH_DTYPES
from hidream_ft.model.safetensors_io import open_safetensors

DTYPE_CHOICES = ("keep", "bf16", "fp16", "fp32")  # keep: the source's own dtypes
EMA_HELP = ("the EMA weights of a run or checkpoint trained with ema.enabled (a run's adapter-ema/, else the "
            "newest checkpoint's average)")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def chosen_dtype(choice: str) -> torch.dtype | None:
    """A ``--dtype`` choice as a torch dtype; None keeps the source's dtypes."""
    return None if choice == "keep" else TORCH_DTYPES[choice]


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 500MB or 1000000")
    return int(float(match[1]) * _UNITS[(match[2] or "b").lower()])


def _found_base_dir(explicit: str | None, metadata: list[dict[str, str]]) -> Path | None:
    """--base, else the base model recorded by training, if that directory exists here."""
    if explicit:
        return Path(explicit)
    for meta in metadata:
        recorded = meta.get(META + "base_model")
        if recorded and Path(recorded).is_dir():
            return Path(recorded)
    return None


def _base_dir(explicit: str | None, metadata: list[dict[str, str]]) -> Path:
    base = _found_base_dir(explicit, metadata)
    if base is None:
        raise ConvertError("no base model: pass --base DIR (the HiDream-O1-Image folder the adapter was trained on)")
    return base


def cmd_export(args) -> None:
    adapter = load_adapter(args.source, args.ema)
    if args.base:
        check_fits(adapter, weight_shapes(args.base), f"the base model at {args.base}")
    if args.trigger is not None:
        adapter.metadata[META + "trigger"] = args.trigger
    if chosen_dtype(args.dtype) is not None:
        adapter = adapter.to(chosen_dtype(args.dtype))
    base = _found_base_dir(args.base, [adapter.metadata])  # read only by formats that need it (DoRA for ComfyUI)
    print(write_lora(adapter, args.to, args.out, base_weights(base) if base is not None else None))


def cmd_inspect(args) -> None:
    path = Path(args.source)
    if path.is_file() and path.suffix == ".safetensors":
        with open_safetensors(path) as f:
            keys = list(f.keys())
        try:
            print(f"style: {parse_lora_keys(keys, str(path)).style.name}")
        except ConvertError:
            pass  # a full state dict; load_source says so below
    source = load_source(path)
    if isinstance(source, FullWeights):
        print(f"full model weights: {len(source.tensors.keys())} tensors")
        for key, value in sorted(source.metadata.items()):
            print(f"{key}: {value}")
    else:
        print(describe(source))


def cmd_merge(args) -> None:
    loras, full, metadata, described = [], None, [], []
    for text in args.sources:
        path, weight = parse_lora_spec(text)
        source = load_source(path, args.ema)
        metadata.append(source.metadata)
        if isinstance(source, FullWeights):
            if full is not None:
                raise ConvertError(f"{path}: only one full fine-tune can be merged at a time")
            if weight != 1.0:
                raise ConvertError(f"{path}: a full fine-tune replaces the base weights; it takes no weight")
            full = source.tensors
            described.append(f"{path} (full)")
        else:
            loras.append((source, weight))
            described.append(f"{path}×{weight:g}")
    base = _base_dir(args.base, metadata)
    dtype = chosen_dtype(args.dtype or ("bf16" if args.layout == "comfyui" else "keep"))
    info = {META + "base_model": str(base), META + "merged": "; ".join(described)}
    print(merge_checkpoint(base, args.out, layout=args.layout, loras=loras, full=full, dtype=dtype,
                           max_shard_bytes=args.max_shard_size, metadata=info))


def cmd_stack(args) -> None:
    weighted = []
    for text in args.sources:
        path, weight = parse_lora_spec(text)
        weighted.append((load_adapter(path), weight))
    stacked = stack_adapters(weighted)
    stacked.metadata[META + "stacked"] = "; ".join(f"{parse_lora_spec(t)[0]}×{w:g}" for t, (_, w) in
                                                   zip(args.sources, weighted))
    if chosen_dtype(args.dtype) is not None:
        stacked = stacked.to(chosen_dtype(args.dtype))
    print(write_lora(stacked, args.to, args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hidream_ft.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="write a LoRA in an inference format (also: import a foreign one)")
    export.add_argument("source")
    export.add_argument("--to", required=True, choices=WRITABLE_STYLES)
    export.add_argument("--out", required=True, help="a directory for peft, a .safetensors file otherwise")
    export.add_argument("--base", help="check the adapter's shapes against this base model directory (a DoRA for "
                        "comfyui needs it; default: the one recorded by training)")
    export.add_argument("--trigger", help="trigger phrase for the file header (default: data.trigger of the run)")
    export.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep")
    export.add_argument("--ema", action="store_true", help=EMA_HELP)
    export.set_defaults(run=cmd_export)

    inspect = commands.add_parser("inspect", help="show the format, modules, ranks and metadata of a source")
    inspect.add_argument("source")
    inspect.set_defaults(run=cmd_inspect)

    merge = commands.add_parser("merge", help="fold LoRAs (and a full fine-tune) into the base model")
    merge.add_argument("sources", nargs="+", metavar="SOURCE[:WEIGHT]")
    merge.add_argument("--out", required=True, help="a directory for hf, a .safetensors file for comfyui")
    merge.add_argument("--layout", choices=LAYOUTS, default="hf")
    merge.add_argument("--base", help="base model directory (default: the one recorded by training)")
    merge.add_argument("--dtype", choices=DTYPE_CHOICES, help="default: keep for hf, bf16 for comfyui")
    merge.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_SHARD_BYTES,
                       help="hf layout: largest shard, e.g. 5GB (default)")
    merge.add_argument("--ema", action="store_true", help=EMA_HELP + " (for every SOURCE)")
    merge.set_defaults(run=cmd_merge)

    stack = commands.add_parser("stack", help="concatenate LoRAs along the rank into one adapter, unmerged")
    stack.add_argument("sources", nargs="+", metavar="SOURCE[:WEIGHT]")
    stack.add_argument("--to", required=True, choices=WRITABLE_STYLES)
    stack.add_argument("--out", required=True)
    stack.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep")
    stack.set_defaults(run=cmd_stack)
    return parser


@entry_point
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
