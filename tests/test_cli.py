"""The trainer from the command line: the README's demo under torchrun, resume through the data pipeline,
one-line errors for bad input."""

import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hidream_ft.demo import write_demo
from hidream_ft.model import load_model

ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def train(*args, nproc=None, check=True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc else [sys.executable]
    cmd = [*launcher, "-m", "hidream_ft.train", *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def scalars(output_dir, tag):
    values = {}
    for events in sorted((output_dir / "tensorboard").glob("events.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


@pytest.mark.distributed
def test_demo_trains_on_two_ranks_and_resumes_exactly(tmp_path):
    config = write_demo(tmp_path / "demo", steps=4)
    out = tmp_path / "demo" / "output"
    common = ["--set", "logging.log_every=1", "--set", "checkpoint.every=2"]
    train("--config", config, *common, "--set", f"logging.output_dir='{tmp_path / 'straight'}'", nproc=2)
    straight = scalars(tmp_path / "straight", "train/loss")
    assert sorted(straight) == [1, 2, 3, 4]
    for tag in ("train/lr", "train/grad_norm", "perf/samples_per_s", "memory/peak_gib"):
        assert scalars(tmp_path / "straight", tag), tag

    # Stop after 2 steps, then a fresh launch continues from the checkpoint with the next unseen samples.
    train("--config", config, *common, "--set", "train.max_steps=2", nproc=2)
    assert (out / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
    train("--config", config, *common, nproc=2)
    resumed = scalars(out, "train/loss")
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


def test_help_lists_the_options():
    result = train("--help")
    assert "--config" in result.stdout and "--set" in result.stdout
