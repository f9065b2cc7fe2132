"""The trainer from the command line: the README's demo under torchrun, resume through the data pipeline,
one-line errors for bad input."""

import pytest
import torch
from peft import PeftModel

from helpers import run_python, tensorboard_scalars
from hidream_ft.demo import write_demo
from hidream_ft.model import load_model


def train(*args, nproc=None, check=True):
    return run_python("-m", "hidream_ft.train", *args, nproc=nproc, timeout=600, check=check)


@pytest.mark.distributed
def test_demo_trains_on_two_ranks_and_resumes_exactly(tmp_path):
    config = write_demo(tmp_path / "demo", steps=4)
    out = tmp_path / "demo" / "output"
    common = ["--set", "logging.log_every=1", "--set", "checkpoint.every=2"]
    train("--config", config, *common, "--set", f"logging.output_dir='{tmp_path / 'straight'}'", nproc=2)
    straight = tensorboard_scalars(tmp_path / "straight", "train/loss")
    assert sorted(straight) == [1, 2, 3, 4]
    for tag in ("train/lr", "train/grad_norm", "perf/samples_per_s", "memory/peak_gib"):
        assert tensorboard_scalars(tmp_path / "straight", tag), tag

    # Stop after 2 steps, then a fresh launch continues from the checkpoint with the next unseen samples.
    train("--config", config, *common, "--set", "train.max_steps=2", nproc=2)
    assert (out / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
    train("--config", config, *common, nproc=2)
    resumed = tensorboard_scalars(out, "train/loss")
    assert resumed[3] == straight[3] and resumed[4] == straight[4]

    base = load_model(tmp_path / "demo" / "tiny-model", dtype=torch.float32)
    adapter = PeftModel.from_pretrained(base, str(out / "adapter"))
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in adapter.named_parameters())


def test_bad_input_gives_one_line_errors(tmp_path):
    config = write_demo(tmp_path / "demo", steps=1)
    cases = [
        (["--set", "optim.lrr=1"], "unknown key 'lrr'; did you mean 'lr'?"),
        (["--set", "model.path='/nowhere/HiDream'"], "model directory not found: /nowhere/HiDream"),
        (["--set", "data.buckets=[[64, 70]]"], "not a multiple of 32"),
    ]
    for overrides, message in cases:
        result = train("--config", config, *overrides, check=False)
        assert result.returncode == 2, result.stderr[-2000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, last
        assert "Traceback" not in result.stderr
