"""Two CPU ranks (gloo) where one rank trains a text-to-image batch while the other trains an edit batch.

Under FSDP the ViT is sharded, so a rank whose batch has no images must still join the ViT's all-gathers and,
when the ViT trains, its gradient reduce-scatters (the zero-weighted "fake" ViT pass); otherwise the step hangs.

This file is also the torchrun worker:
    torchrun --nproc_per_node 2 tests/test_edit_distributed.py OUT.json CHECKPOINT_DIR RUN_DIR
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
STEPS = 3


def run_worker(out: Path, checkpoint: Path, run_dir: Path) -> None:
    import torch

    from hidream_ft.config import load_config
    from hidream_ft.data.collate import TrainCollator
    from hidream_ft.model.references import ConditionProcessor
    from hidream_ft.parallel.distributed import init_distributed, shutdown
    from hidream_ft.train import Trainer
    from test_edit_training import edit_samples, t2i_samples

    env = init_distributed()
    report = {}
    for name, vit_options in [("frozen_vit", []), ("vit_lora", ["lora.include_visual=true"])]:
        cfg = load_config(None, [
            f"model.path='{checkpoint}'", "model.dtype='float32'", "parallel.param_dtype='float32'",
            f"logging.output_dir='{run_dir / name}'", "optim.lr=1e-2", "lora.train_heads=['final_layer2']",
            *vit_options,
        ])
        trainer = Trainer(cfg, env)
        collate = TrainCollator(trainer.tokenizer, trainer.tokens, 128, ConditionProcessor.from_pretrained(checkpoint))
        # Tasks alternate between the ranks: step 0 rank 0 edits, step 1 rank 1 edits, …
        batches = [collate(edit_samples()[:1]), collate(t2i_samples()[:1])]
        visual = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad and ".visual." in n}
        before = {n: p.detach().full_tensor().clone() for n, p in visual.items()}
        losses = [trainer.step([batches[(step + env.rank) % 2]])["loss"] for step in range(STEPS)]
        changed = sorted(n for n, p in visual.items() if not torch.equal(p.detach().full_tensor(), before[n]))
        report[name] = {"losses": losses, "visual_trainable": len(visual), "visual_changed": len(changed)}
    if env.rank == 0:
        out.write_text(json.dumps(report))
    shutdown()


def test_ranks_with_different_tasks_step_together(tiny_checkpoint, tmp_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(out), str(tiny_checkpoint), str(tmp_path / "runs")]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # Its own process group, so a hang (the failure this test looks for) is killed with both ranks.
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("the ranks hung: a rank without images skipped a ViT collective")
    assert process.returncode == 0, stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["frozen_vit"]["visual_trainable"] == 0
    vit = report["vit_lora"]
    assert vit["visual_trainable"] == 2 * 4 * 2  # A and B of qkv, proj, fc1, fc2 in 2 ViT blocks
    assert vit["visual_changed"] > 0  # the edit rank's ViT gradients reached every rank's shards
    for run in report.values():
        assert len(run["losses"]) == STEPS and all(loss == loss for loss in run["losses"])


if __name__ == "__main__":
    run_worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
