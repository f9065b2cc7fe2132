"""Run by tests/test_optim8bit.py (under torchrun, or plain python for one rank): train the tiny model with
adamw8bit, optionally resume and save through the trainer's DCP checkpoints, dump the optimizer moments.

    [torchrun --nproc_per_node R] tests/optim8bit_worker.py OUT.pt STEPS [--resume] [--save] -- KEY=VALUE...

OUT.pt (written by rank 0): {"losses": {step: loss}, "resumed": moments right after --resume (else None),
"final": moments at the end, "eight_bit": names whose moments are stored in 8 bits}; moments are
{name: (exp_avg, exp_avg_sq, step)} as full fp32 tensors, from the optimizer's state_dict.
"""

import argparse

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from hidream_ft.config import load_config
from hidream_ft.data.collate import TextToImageCollator
from hidream_ft.data.samples import Sample
from hidream_ft.parallel.distributed import init_distributed
from hidream_ft.train import Trainer

CAPTIONS = ["a red circle", "a green square on a blue background", "a yellow triangle", "the lazy dog"]


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def moments(trainer) -> dict:
    names = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    exported = trainer.optimizer.state_dict()["state"]
    return {names[i]: (full(s["exp_avg"]), full(s["exp_avg_sq"]), int(s["step"])) for i, s in exported.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("steps", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--save", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    env = init_distributed()
    trainer = Trainer(load_config(None, args.overrides), env)
    collate = TextToImageCollator(trainer.tokenizer, trainer.tokens, 128)
    g = torch.Generator().manual_seed(0)
    # Fixed noise seeds: every step sees the same noise, so the loss is one objective that must go down.
    samples = [Sample(torch.rand(3, 64, 64, generator=g) * 2 - 1, c, f"s{i}", noise_seed=i)
               for i, c in enumerate(CAPTIONS)]
    batch = collate(samples[env.rank :: env.world_size])
    step = trainer.resume()[0] if args.resume else 0
    resumed = moments(trainer) if args.resume else None
    losses = {}
    while step < args.steps:
        losses[step + 1] = trainer.step([batch])["loss"]
        step += 1
    if args.save:
        trainer.save_checkpoint(step, {"position": step})
    final = moments(trainer)
    eight_bit = [name for (name, p) in trainer.model.named_parameters() if p.requires_grad
                 and trainer.optimizer.is_8bit(p)]
    if env.is_main:
        torch.save({"losses": losses, "resumed": resumed, "final": final, "eight_bit": eight_bit}, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
