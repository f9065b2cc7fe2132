"""Prepare the CPU demo: a tiny official-layout checkpoint, a captioned demo dataset and a config.

    python -m hidream_ft.demo runs/demo
    torchrun --standalone --nproc_per_node 2 -m hidream_ft.train --config runs/demo/train.toml
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hidream_ft.config import load_config, to_toml
from hidream_ft.data.demo import write_demo_dataset
from hidream_ft.testing.tiny import write_tiny_checkpoint


def write_demo(out_dir: str | Path, steps: int = 20) -> Path:
    out = Path(out_dir).resolve()
    model = write_tiny_checkpoint(out / "tiny-model")
    data = write_demo_dataset(out / "data", n=16, size=(64, 64))
    cfg = load_config(None, [
        f"model.path='{model}'", "model.dtype='float32'", "parallel.param_dtype='float32'",
        f"data.folders=['{data}']", "data.buckets=[[64, 64]]", "data.num_workers=1", "data.pin_memory=false",
        "data.caption_dropout=0.1", f"train.max_steps={steps}", "train.batch_size=2",
        "lora.rank=8", "lora.alpha=8.0", "lora.train_heads=['final_layer2']", "optim.lr=1e-3",
        "optim.warmup_steps=2", "optim.schedule='cosine'", "checkpoint.every=10",
        f"logging.output_dir='{out / 'output'}'", "logging.log_every=2",
    ])
    config = out / "train.toml"
    config.write_text(to_toml(cfg))
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    print(write_demo(args.out_dir, args.steps))


if __name__ == "__main__":
    main()
