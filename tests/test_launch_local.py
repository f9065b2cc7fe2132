"""launch.submit end to end on submitit's local and debug executors: process groups, training, sweeps,
preemption of a training run."""

import json
import os
import re
import signal
from pathlib import Path

import pytest
from submitit.core.utils import JobPaths

import hidream_ft.trainer as train_module
from helpers import descendants, tensorboard_scalars, wait_for, write_config
from hidream_ft.config import load_config
from hidream_ft.data.demo import write_demo_dataset
from launch import submit
from launch.jobs import TRAIN_ENTRYPOINT
from launch.sweep import plan

pytestmark = pytest.mark.distributed
TWO_CPU_TASKS = "[slurm]\ngpus_per_node = 0\ntasks_per_node = 2\ntime_min = 10\n"


def test_two_task_local_job_forms_a_gloo_process_group(tmp_path, capsys):
    config = write_config(tmp_path, TWO_CPU_TASKS)
    assert submit.main(["--config", str(config), "--cluster", "local", "--check"]) == 0
    out = capsys.readouterr().out
    assert out.count("'world_size': 2, 'backend': 'gloo'") == 2 and out.count("'sum': 3.0") == 2


def test_debug_cluster_runs_the_task_in_this_process(tmp_path, capsys):
    config = write_config(tmp_path, TWO_CPU_TASKS)
    assert submit.main(["--config", str(config), "--cluster", "debug", "--check"]) == 0
    assert "'rank': 0, 'world_size': 1" in capsys.readouterr().out


# The trainer through the launcher: tiny model, demo images, two CPU ranks.

TRAIN_STEPS = 20


@pytest.fixture(scope="module")
def train_config(tmp_path_factory, tiny_checkpoint):
    """write(name, **train) → a config file for a tiny LoRA run into runs/<name>."""
    root = tmp_path_factory.mktemp("launch-train")
    data = write_demo_dataset(root / "data", n=8)

    def write(name: str, max_steps: int = TRAIN_STEPS) -> Path:
        config = root / f"{name}.toml"
        config.write_text(
            f'[model]\npath = "{tiny_checkpoint}"\ndtype = "float32"\n[parallel]\nparam_dtype = "float32"\n'
            f'[data]\nfolders = ["{data}"]\nbuckets = [[64, 64]]\nnum_workers = 1\n'
            f'[train]\nmax_steps = {max_steps}\n[optim]\nlr = 3e-3\n[checkpoint]\nevery = 1000\n'
            f'[logging]\noutput_dir = "{root / "runs" / name}"\nlog_every = 1\n'
            f'[slurm]\ngpus_per_node = 0\ntasks_per_node = 2\ntime_min = 10\n')
        return config

    return write


def complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*/COMPLETE"))


@pytest.fixture(scope="module")
def uninterrupted_run(train_config):
    config = train_config("uninterrupted")
    assert submit.main(["--config", str(config), "--cluster", "local", "--then-export", "comfyui"]) == 0
    return load_config(config).logging.output_dir


def test_local_job_trains_the_tiny_model_on_two_ranks_then_exports(uninterrupted_run):
    run_dir = Path(uninterrupted_run)
    assert (run_dir / "export" / "lora-comfyui.safetensors").stat().st_size > 0
    assert complete_steps(run_dir) == [TRAIN_STEPS]
    assert json.loads((run_dir / "checkpoints" / f"step-{TRAIN_STEPS:08d}" / "meta.json").read_text())[
        "world_size"] == 2
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(tensorboard_scalars(run_dir, "train/loss")) == list(range(1, TRAIN_STEPS + 1))


def test_sweep_points_run_as_an_array_each_in_its_own_run_dir(train_config, capsys):
    config = train_config("sweep", max_steps=2)
    assert submit.main(["--config", str(config), "--cluster", "local", "--set", "slurm.tasks_per_node=1",
                        "--sweep", "lora.rank=[4, 8]"]) == 0
    base = Path(load_config(config).logging.output_dir)
    manifest = json.loads((base / "sweep.json").read_text())
    assert [p["name"] for p in manifest["points"]] == ["rank=4", "rank=8"] and len(manifest["job_ids"]) == 2
    for point in manifest["points"]:
        run_dir = Path(point["output_dir"])
        assert run_dir == base / point["name"] and complete_steps(run_dir) == [2]
        resolved = load_config(run_dir / "config.toml")
        assert resolved.lora.rank == point["values"]["lora.rank"] and resolved.logging.output_dir == str(run_dir)
        adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
        assert adapter["r"] == point["values"]["lora.rank"]


@pytest.mark.skipif("PreemptionHandler" not in Path(train_module.__file__).read_text(),
                    reason="hidream_ft.train does not install the PreemptionHandler yet")
def test_preempted_run_checkpoints_requeues_and_continues_with_the_same_losses(train_config, uninterrupted_run):
    config = train_config("preempted")
    jobs = submit.submit(plan(config, [], []), "local", TRAIN_ENTRYPOINT, None)
    (job,) = jobs
    log = JobPaths(job.paths.folder, job.job_id, 0).stderr
    started = re.compile(rf"\| *[1-9]\d*/{TRAIN_STEPS} ")
    wait_for(lambda: log.exists() and started.search(log.read_text(errors="replace")), "the first training step")
    for pid in descendants(int(job.job_id)):  # the time-limit warning, to every process of the job
        os.kill(pid, signal.SIGUSR2)
    assert job.results() == [0, 0]
    run_dir = Path(load_config(config).logging.output_dir)
    resumed = re.findall(r"resumed at step (\d+)", log.read_text(errors="replace"))
    assert len(resumed) == 1, "the job was not requeued exactly once"
    stopped_at = int(resumed[0])
    assert 0 < stopped_at < TRAIN_STEPS and complete_steps(run_dir) == [stopped_at, TRAIN_STEPS]
    reference = tensorboard_scalars(Path(uninterrupted_run), "train/loss")
    continued = tensorboard_scalars(run_dir, "train/loss")
    assert continued[stopped_at + 1] == reference[stopped_at + 1]
    assert continued == reference
