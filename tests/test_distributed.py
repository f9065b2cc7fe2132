"""Multi-process training on CPU (gloo): sharded equivalence, exact resume, resharding."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "workers" / "fixed_batches.py"
pytestmark = pytest.mark.distributed


def torchrun(nproc: int, *args, timeout=300) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(WORKER), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-4000:]


def overrides(tiny_checkpoint, out_dir, mode="lora"):
    common = [f"model.path={tiny_checkpoint}", "model.dtype=float32", "parallel.param_dtype=float32",
              f"logging.output_dir={out_dir}", f"train.mode={mode}", "optim.lr=3e-3", "train.max_steps=4"]
    return common + (["lora.train_heads=['final_layer2']"] if mode == "lora" else [])


def run_worker(tmp_path, name, nproc, steps, opts, *flags):
    out = tmp_path / f"{name}.json"
    torchrun(nproc, out, steps, *flags, *(arg for opt in opts for arg in ("--set", opt)))
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_two_ranks_match_one_rank_on_the_same_global_batch(tiny_checkpoint, tmp_path, mode):
    one = run_worker(tmp_path, "one", 1, 3, overrides(tiny_checkpoint, tmp_path / "r1", mode))
    two = run_worker(tmp_path, "two", 2, 3, overrides(tiny_checkpoint, tmp_path / "r2", mode))
    for step, loss in one["losses"].items():
        assert two["losses"][step] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    for key, values in one["params"].items():
        assert two["params"][key] == pytest.approx(values, rel=1e-3, abs=1e-5), key


def test_resume_is_bit_exact(tiny_checkpoint, tmp_path):
    opts = overrides(tiny_checkpoint, tmp_path / "run", "full")
    straight = run_worker(tmp_path, "straight", 2, 4, overrides(tiny_checkpoint, tmp_path / "straight", "full"))
    run_worker(tmp_path, "first", 2, 4, opts, "--save-at", 2)
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
    resumed = run_worker(tmp_path, "second", 2, 4, opts, "--resume")
    assert resumed["losses"] == {k: v for k, v in straight["losses"].items() if int(k) > 2}
    assert resumed["digest"] == straight["digest"]


@pytest.mark.parametrize("save_ranks, load_ranks", [(2, 1), (1, 2)])
def test_checkpoints_reshard(tiny_checkpoint, tmp_path, save_ranks, load_ranks):
    opts = overrides(tiny_checkpoint, tmp_path / "run", "lora")
    straight = run_worker(tmp_path, "straight", save_ranks, 4, overrides(tiny_checkpoint, tmp_path / "s", "lora"))
    run_worker(tmp_path, "first", save_ranks, 4, opts, "--save-at", 2)
    resumed = run_worker(tmp_path, "second", load_ranks, 4, opts, "--resume")
    for step in ("3", "4"):
        assert resumed["losses"][step] == pytest.approx(straight["losses"][step], rel=1e-5, abs=1e-6)
    for key, values in straight["params"].items():
        assert resumed["params"][key] == pytest.approx(values, rel=1e-3, abs=1e-5), key
