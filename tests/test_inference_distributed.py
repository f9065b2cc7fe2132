"""Validation images from an FSDP2-sharded LoRA model: every rank renders, all agree with one process."""

import pytest
import torch

from helpers import WORKERS, run_python

pytestmark = pytest.mark.distributed


def test_sharded_validation_matches_one_process(tiny_checkpoint, tmp_path):
    out = tmp_path / "images.pt"
    run_python(WORKERS / "sharded_validation.py", tiny_checkpoint, out, nproc=2)
    rank0, rank1 = (torch.load(f"{out}.rank{r}", weights_only=False) for r in (0, 1))
    assert rank0["training"] and rank1["training"]
    for (prompt, sharded), (same_prompt, other_rank), (_, single) in zip(
            rank0["images"], rank1["images"], rank0["reference"]):
        assert prompt == same_prompt
        assert torch.equal(sharded, other_rank)
        assert (sharded.int() - single.int()).abs().max() <= 1
