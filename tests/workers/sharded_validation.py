"""Run under torchrun by tests/test_inference_distributed.py: render validation images from an FSDP2-sharded
LoRA model on every rank, and (rank 0) from the same model unsharded.

    torchrun --nproc_per_node 2 tests/workers/sharded_validation.py CHECKPOINT OUT.pt

Each rank saves {"images", "reference" (rank 0, else None), "training"} to OUT.pt.rank<R>.
"""

import argparse

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import fully_shard

from hidream_ft.config import ValidationConfig
from hidream_ft.inference import render_validation
from hidream_ft.model import SpecialTokens, load_hf_config, load_model, load_tokenizer


def lora_model(checkpoint: str):
    model = get_peft_model(load_model(checkpoint, dtype=torch.float32),
                           LoraConfig(r=2, lora_alpha=4, target_modules=r".*self_attn\.(q_proj|o_proj)"))
    generator = torch.Generator().manual_seed(0)  # PEFT's own init differs per process; this adapter does not
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = load_tokenizer(args.checkpoint)
    tokens = SpecialTokens.from_tokenizer(tokenizer, load_hf_config(args.checkpoint))
    cfg = ValidationConfig(every=1, prompts=["a red circle", "a green square"], steps=2, width=64, height=64)
    model = lora_model(args.checkpoint)
    reference = render_validation(model, tokenizer, tokens, cfg, "cpu") if rank == 0 else None
    for layer in model.base_model.model.model.language_model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.train()
    images = render_validation(model, tokenizer, tokens, cfg, "cpu")  # all ranks, identical arguments
    torch.save({"images": images, "reference": reference, "training": model.training}, f"{args.out}.rank{rank}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
