"""Two CPU ranks (gloo) where one rank trains a text-to-image batch while the other trains an edit batch.

Under FSDP the ViT is sharded, so a rank whose batch has no images must still join the ViT's all-gathers and,
when the ViT trains, its gradient reduce-scatters (the zero-weighted "fake" ViT pass); otherwise the step hangs.
"""

import json
import subprocess

import pytest

from helpers import WORKERS, run_python

pytestmark = pytest.mark.distributed
STEPS = 3


def test_ranks_with_different_tasks_step_together(tiny_checkpoint, tmp_path):
    out = tmp_path / "report.json"
    try:
        run_python(WORKERS / "mixed_tasks.py", tiny_checkpoint, tmp_path / "runs", out, STEPS, nproc=2)
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks hung: a rank without images skipped a ViT collective")
    report = json.loads(out.read_text())
    assert report["frozen_vit"]["visual_trainable"] == 0
    vit = report["vit_lora"]
    assert vit["visual_trainable"] == 2 * 4 * 2  # A and B of qkv, proj, fc1, fc2 in 2 ViT blocks
    assert vit["visual_changed"] > 0  # the edit rank's ViT gradients reached every rank's shards
    for run in report.values():
        assert len(run["losses"]) == STEPS and all(loss == loss for loss in run["losses"])
