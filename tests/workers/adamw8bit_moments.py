"""Run under torchrun by tests/test_optim8bit.py: train the tiny model with adamw8bit, optionally resume and
save through the trainer's DCP checkpoints, dump the optimizer moments.

    torchrun --nproc_per_node R tests/workers/adamw8bit_moments.py CHECKPOINT RUN_DIR OUT.pt STEPS
        [--resume] [--save] [--set KEY=VALUE]...

OUT.pt (written by rank 0): {"losses": {step: loss}, "resumed": moments right after --resume (else None),
"final": moments at the end, "eight_bit": names whose moments are stored in 8 bits}; moments are
{name: (exp_avg, exp_avg_sq, step)} as full fp32 tensors, from the optimizer's state_dict (8-bit codes and
scales gathered, then dequantised).
"""

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from helpers import make_trainer, noise_samples, training_worker_arguments
from hidream_ft.data.collate import TextToImageCollator
from hidream_ft.optim.adamw8bit import MOMENTS, dequantize_blockwise, quantization_map
from hidream_ft.parallel.distributed import shutdown


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def moments(trainer) -> dict:
    names = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    exported = trainer.optimizer.state_dict()["state"]
    result = {}
    for i, state in exported.items():
        if "exp_avg_codes" in state:
            values = [dequantize_blockwise(full(state[f"{name}_codes"]), full(state[f"{name}_scales"]),
                                           quantization_map(signed)) for name, signed in MOMENTS]
        else:
            values = [full(state["exp_avg"]), full(state["exp_avg_sq"])]
        result[names[i]] = (*values, int(state["step"]))
    return result


def main() -> None:
    parser = training_worker_arguments()
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    trainer = make_trainer(args.checkpoint, args.run_dir, *args.set)
    env = trainer.env
    collate = TextToImageCollator(trainer.tokenizer, trainer.tokens, 128)
    # Fixed noise seeds: every step sees the same noise, so the loss is one objective that must go down.
    batch = collate(noise_samples()[env.rank :: env.world_size])
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
    shutdown()


if __name__ == "__main__":
    main()
