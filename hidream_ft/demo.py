"""Prepare the CPU demo: a tiny official-layout checkpoint, a captioned demo dataset and a config.

    python -m hidream_ft.demo runs/demo
    torchrun --standalone --nproc_per_node 2 -m hidream_ft.train --config runs/demo/train.toml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hidream_ft.cli import entry_point
from hidream_ft.config import load_config, to_toml
from hidream_ft.data.demo import write_demo_dataset
from hidream_ft.testing.tiny import write_tiny_checkpoint


def write_demo(out_dir: str | Path, steps: int = 20) -> Path:
    """Write the demo into ``out_dir``; its ``train.toml`` names the files with ``./`` paths, which the config
    loader resolves against the file's folder, so the folder can be moved."""
    out = Path(out_dir)
    write_tiny_checkpoint(out / "tiny-model")
    write_demo_dataset(out / "data", n=16, size=(64, 64))
    cfg = load_config(None, [
        "model.path='./tiny-model'", "model.dtype='float32'", "parallel.param_dtype='float32'",
        "data.folders=['./data']", "data.buckets=[[64, 64]]", "data.num_workers=1",
        "data.pin_memory=false", "data.caption_dropout=0.1", f"train.max_steps={steps}", "train.batch_size=2",
        "lora.rank=8", "lora.alpha=8.0", "lora.train_heads=['final_layer2']", "optim.lr=1e-3",
        "optim.warmup_steps=2", "optim.schedule='cosine'", "checkpoint.every=10",
        "logging.output_dir='./output'", "logging.log_every=2",
    ])
    config = out / "train.toml"
    config.write_text(to_toml(cfg))
    return config


@entry_point
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m hidream_ft.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    print(write_demo(args.out_dir, args.steps))


if __name__ == "__main__":
    sys.exit(main())
