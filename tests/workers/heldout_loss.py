"""Run by tests/test_heldout_loss.py: the held-out loss of the tiny checkpoint, FSDP2-sharded over every rank
under torchrun, or unsharded in one plain process.

    torchrun --nproc_per_node 2 tests/workers/heldout_loss.py CHECKPOINT FOLDERS OUT.pt
    python tests/workers/heldout_loss.py CHECKPOINT FOLDERS OUT.pt

Each rank saves its HeldoutLoss to OUT.pt.rank<R> (one process: OUT.pt.rank0).
"""

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from hidream_ft.config import DataConfig, FolderSource
from hidream_ft.data.collate import TrainCollator
from hidream_ft.data.heldout import HeldoutBatches
from hidream_ft.inference.heldout import heldout_loss
from hidream_ft.model import SpecialTokens, load_hf_config, load_model, load_tokenizer
from hidream_ft.model.conditioning import ConditionProcessor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("folders", type=Path)
    parser.add_argument("out")
    args = parser.parse_args()
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    tokenizer = load_tokenizer(args.checkpoint)
    tokens = SpecialTokens.from_tokenizer(tokenizer, load_hf_config(args.checkpoint))
    collate = TrainCollator(tokenizer, tokens, 48, ConditionProcessor.from_pretrained(args.checkpoint))
    folders = [FolderSource(str(args.folders / "square")), FolderSource(str(args.folders / "wide")),
               FolderSource(str(args.folders / "edit"), control_dir=str(args.folders / "source"))]
    # Batches of two: 4 batches of 2, 1, 2 and 1 samples (6 in all).
    batches = HeldoutBatches(DataConfig(buckets=[[64, 64], [96, 64]], max_text_tokens=48), folders, 2, collate)
    model = load_model(args.checkpoint, dtype=torch.float32, tokenizer=tokenizer)
    if distributed:
        for layer in model.model.language_model.layers:
            fully_shard(layer)
        fully_shard(model)
    torch.save(heldout_loss(model, batches, [0.2, 0.9], seed=3), f"{args.out}.rank{rank}")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
