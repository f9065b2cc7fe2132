"""Run under torchrun by tests/test_edit_distributed.py: two ranks train LoRA together while one rank has a
text-to-image batch and the other an edit batch (they swap every step); reports per run as JSON.

    torchrun --nproc_per_node 2 tests/workers/mixed_tasks.py CHECKPOINT RUN_DIR OUT.json STEPS
"""

import json
from pathlib import Path

import torch

from helpers import edit_samples, make_trainer, t2i_samples, training_worker_arguments
from hidream_ft.data.collate import TrainCollator
from hidream_ft.model.conditioning import ConditionProcessor
from hidream_ft.parallel.distributed import shutdown


def main() -> None:
    parser = training_worker_arguments()
    args = parser.parse_args()
    report = {}
    for name, vit_options in [("frozen_vit", []), ("vit_lora", ["lora.include_visual=true"])]:
        trainer = make_trainer(args.checkpoint, args.run_dir / name, "optim.lr=1e-2",
                               "lora.train_heads=['final_layer2']", *vit_options)
        env = trainer.env
        collate = TrainCollator(trainer.tokenizer, trainer.tokens, 128,
                                ConditionProcessor.from_pretrained(args.checkpoint))
        # Tasks alternate between the ranks: step 0 rank 0 edits, step 1 rank 1 edits, …
        batches = [collate(edit_samples()[:1]), collate(t2i_samples()[:1])]
        visual = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad and ".visual." in n}
        before = {n: p.detach().full_tensor().clone() for n, p in visual.items()}
        losses = [trainer.step([batches[(step + env.rank) % 2]])["loss"] for step in range(args.steps)]
        changed = sorted(n for n, p in visual.items() if not torch.equal(p.detach().full_tensor(), before[n]))
        report[name] = {"losses": losses, "visual_trainable": len(visual), "visual_changed": len(changed)}
    if env.is_main:
        args.out.write_text(json.dumps(report))
    shutdown()


if __name__ == "__main__":
    main()
