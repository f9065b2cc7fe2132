"""Validation images from an FSDP2-sharded LoRA model: every rank renders, all agree with one process.

Run as a test (spawns ``torchrun``), or by torchrun as the worker: ``python this_file.py MODEL_DIR OUT.pt``.
"""

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.distributed


def _lora_model(model_dir: str):
    from peft import LoraConfig, get_peft_model

    from hidream_ft.model import load_model

    model = get_peft_model(load_model(model_dir, dtype=torch.float32),
                           LoraConfig(r=2, lora_alpha=4, target_modules=r".*self_attn\.(q_proj|o_proj)"))
    generator = torch.Generator().manual_seed(0)  # PEFT's own init differs per process; this adapter does not
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    return model


def worker(model_dir: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from hidream_ft.config import ValidationConfig
    from hidream_ft.inference import render_validation
    from hidream_ft.model import SpecialTokens, load_hf_config, load_tokenizer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = load_tokenizer(model_dir)
    tokens = SpecialTokens.from_tokenizer(tokenizer, load_hf_config(model_dir))
    cfg = ValidationConfig(every=1, prompts=["a red circle", "a green square"], steps=2, width=64, height=64)
    model = _lora_model(model_dir)
    reference = render_validation(model, tokenizer, tokens, cfg, "cpu") if rank == 0 else None
    for layer in model.base_model.model.model.language_model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.train()
    images = render_validation(model, tokenizer, tokens, cfg, "cpu")  # all ranks, identical arguments
    torch.save({"images": images, "reference": reference, "training": model.training}, f"{out}.rank{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_sharded_validation_matches_one_process(tiny_checkpoint, tmp_path):
    out = tmp_path / "images.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           str(tiny_checkpoint), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (torch.load(f"{out}.rank{r}", weights_only=False) for r in (0, 1))
    assert rank0["training"] and rank1["training"]
    for (prompt, sharded), (same_prompt, other_rank), (_, single) in zip(
            rank0["images"], rank1["images"], rank0["reference"]):
        assert prompt == same_prompt
        assert torch.equal(sharded, other_rank)
        assert (sharded.int() - single.int()).abs().max() <= 1


if __name__ == "__main__":
    worker(*sys.argv[1:])
