"""launch.submit end to end on submitit's local and debug executors: process groups, preemption and requeue."""

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import submitit
from submitit.core.utils import JobPaths

import hidream_ft.train as train_module
from hidream_ft.config import load_config
from hidream_ft.data.demo import write_demo_dataset
from hidream_ft.parallel.distributed import init_distributed, shutdown
from hidream_ft.parallel.preemption import PreemptionHandler
from launch import submit
from launch.jobs import TRAIN_ENTRYPOINT, DistributedJob
from launch.sweep import plan

pytestmark = pytest.mark.distributed
TESTS = Path(__file__).resolve().parent


@pytest.fixture()
def tests_importable(monkeypatch):
    """Job processes import their entry point by name: let them find this module."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))


def wait_for(condition, what: str, timeout: float = 120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def task_pids(job: submitit.Job) -> dict[int, int]:
    """{task rank: pid} of a local job's running tasks (children of its controller, whose pid is the job id)."""
    controller = int(job.job_id)
    children = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
    pids = {}
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next(int(v.split(b"=")[1]) for v in environ if v.startswith(b"SUBMITIT_LOCAL_GLOBALID="))
        pids[rank] = pid
    return pids


def write_config(tmp_path, text: str) -> Path:
    config = tmp_path / "train.toml"
    config.write_text(f'[logging]\noutput_dir = "{tmp_path / "runs"}"\n'
                      f'[slurm]\ngpus_per_node = 0\ntasks_per_node = 2\ntime_min = 10\n{text}')
    return config


def test_two_task_local_job_forms_a_gloo_process_group(tmp_path, capsys):
    assert submit.main(["--config", str(write_config(tmp_path, "")), "--cluster", "local", "--check"]) == 0
    out = capsys.readouterr().out
    assert out.count("'world_size': 2, 'backend': 'gloo'") == 2 and out.count("'sum': 3.0") == 2


def test_debug_cluster_runs_the_task_in_this_process(tmp_path, capsys):
    assert submit.main(["--config", str(write_config(tmp_path, "")), "--cluster", "debug", "--check"]) == 0
    assert "'rank': 0, 'world_size': 1" in capsys.readouterr().out


def counting_job(out_dir: str, steps: int) -> dict:
    """The shape of the trainer's loop around a PreemptionHandler, with a step counter as the checkpoint."""
    env = init_distributed()
    out = Path(out_dir)
    state = out / "state.json"
    start = json.loads(state.read_text())["step"] if state.exists() else 0
    try:
        preemption = PreemptionHandler().install()
        for step in range(start, steps):
            time.sleep(0.01)
            (out / f"rank{env.rank}-step{step}").touch()
            if preemption.should_stop():
                if env.rank == 0:
                    state.write_text(json.dumps({"step": step + 1}))
                preemption.requeue_exit()
        preemption.uninstall()
        return {"rank": env.rank, "started_at": start}
    finally:
        shutdown()


def test_a_signal_to_one_rank_stops_all_ranks_at_the_same_step_and_requeues(tmp_path, tests_importable):
    executor = submitit.LocalExecutor(tmp_path / "submitit")
    executor.update_parameters(tasks_per_node=2, gpus_per_node=0, timeout_min=10)
    job = executor.submit(DistributedJob("test_launch_local:counting_job", str(tmp_path), 40))
    wait_for(lambda: (tmp_path / "rank0-step2").exists() and (tmp_path / "rank1-step2").exists(), "two steps")
    os.kill(task_pids(job)[1], signal.SIGUSR2)  # only rank 1 hears it
    results = job.results()
    stopped_after = json.loads((tmp_path / "state.json").read_text())["step"]
    assert 2 < stopped_after < 40
    # Both ranks were restarted by the requeue and resumed where rank 0's "checkpoint" said.
    assert results == [{"rank": 0, "started_at": stopped_after}, {"rank": 1, "started_at": stopped_after}]
    assert all((tmp_path / f"rank{r}-step{s}").exists() for r in (0, 1) for s in range(40))


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


def losses(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {event.step: event.value for event in events.Scalars("train/loss")}


def complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*/COMPLETE"))


@pytest.fixture(scope="module")
def uninterrupted_run(train_config):
    config = train_config("uninterrupted")
    assert submit.main(["--config", str(config), "--cluster", "local"]) == 0
    return load_config(config).logging.output_dir


def test_local_job_trains_the_tiny_model_on_two_ranks(uninterrupted_run):
    run_dir = Path(uninterrupted_run)
    assert complete_steps(run_dir) == [TRAIN_STEPS]
    assert json.loads((run_dir / "checkpoints" / f"step-{TRAIN_STEPS:08d}" / "meta.json").read_text())[
        "world_size"] == 2
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(losses(run_dir)) == list(range(1, TRAIN_STEPS + 1))


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


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``: the job's tasks and their data-loader workers, as SLURM would signal them."""
    found = []
    for thread in Path(f"/proc/{pid}/task").iterdir():
        for child in map(int, (thread / "children").read_text().split()):
            found += [child, *descendants(child)]
    return found


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
    reference, continued = losses(Path(uninterrupted_run)), losses(run_dir)
    assert continued[stopped_at + 1] == reference[stopped_at + 1]
    assert continued == reference
