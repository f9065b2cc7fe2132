"""Train HiDream-O1-Image: LoRA or full fine-tune, one process or many (torchrun, SLURM).

    torchrun --nproc_per_node 8 -m hidream_ft.train --config configs/lora.toml [--set optim.lr=5e-5 ...]
    python -m hidream_ft.train --config configs/lora.toml        # one process, same code path
"""

from __future__ import annotations

import argparse
import sys

from hidream_ft.cli import entry_point
from hidream_ft.config import load_config


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hidream_ft.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="TOML file (every key: docs/config.md)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.lr=5e-5 (repeatable)")
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    # Imported only now: torch, transformers and peft take seconds that --help and a config error need not wait.
    from hidream_ft.parallel.distributed import shutdown
    from hidream_ft.trainer import check_inputs, run

    check_inputs(cfg)
    try:
        run(cfg)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
