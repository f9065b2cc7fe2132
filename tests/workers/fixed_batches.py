"""Run under torchrun by tests/test_distributed.py: train on a fixed global batch sequence, report as JSON.

    torchrun --nproc_per_node R tests/workers/fixed_batches.py CHECKPOINT RUN_DIR OUT.json STEPS
        [--save-at K] [--resume] [--set KEY=VALUE]...

Every step's global batch is the same 4 samples whatever R is; rank r takes samples r, r+R, …, so runs on
different numbers of ranks see identical data and noise (noise is seeded per sample).
"""

import hashlib
import json

import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from helpers import make_trainer, noise_samples, training_worker_arguments
from hidream_ft.data.collate import TrainCollator
from hidream_ft.model.conditioning import ConditionProcessor
from hidream_ft.parallel.distributed import shutdown
from hidream_ft.preservation import preservation_prompts


def sha256_of(tensors: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = training_worker_arguments()
    parser.add_argument("--save-at", type=int, default=0)
    args = parser.parse_args()
    trainer = make_trainer(args.checkpoint, args.run_dir, *args.set)
    env = trainer.env
    collate = TrainCollator(trainer.tokenizer, trainer.tokens, 128, ConditionProcessor.from_pretrained(args.checkpoint),
                            preservation_prompts(trainer.cfg.preservation))
    start = trainer.resume()[0] if args.resume else 0
    losses, terms = {}, {}
    for step in range(start, args.steps):
        mine = noise_samples(seed=step, first_noise_seed=step * 100)[env.rank :: env.world_size]
        stats = trainer.step([collate(mine)])
        losses[step + 1], terms[step + 1] = stats["loss"], stats["terms"]
        if args.save_at and step + 1 == args.save_at:
            trainer.save_checkpoint(step + 1, {"position": step + 1})
            break
    # Frozen parameters this rank holds only a shard of.
    frozen_shards = sum(isinstance(p, DTensor) and p.to_local().shape != p.shape
                        for p in trainer.model.parameters() if not p.requires_grad)
    state = get_model_state_dict(trainer.model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    # Gathered (a collective) on every rank.
    ema = {} if trainer.ema is None else {
        name: average.full_tensor() if isinstance(average, DTensor) else average
        for name, average in trainer.ema.averages.items()}
    if env.is_main:
        params = {k: v.float().flatten()[:64].tolist() for k, v in sorted(state.items())}
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "terms": terms, "digest": sha256_of(state), "ema_digest": sha256_of(ema), "params": params,
                       "world_size": env.world_size, "skipped": trainer.skipped_total,
                       "frozen_shards": frozen_shards}, f)
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
