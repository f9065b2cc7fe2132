"""A run survives what happens to it: re-running or extending a finished run, a second job on the same output
folder, a launcher that dies, checkpoint files that try to run code, and kill -9 at any moment."""

import contextlib
import itertools
import json
import multiprocessing
import os
import pickle
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import descendants, run_python, set_flags, start_python, tensorboard_scalars, wait_for
from hidream_ft.config import load_config
from hidream_ft.demo import write_demo
from hidream_ft.runtime.checkpoint import CheckpointReadError, complete_checkpoints
from hidream_ft.runtime.lock import HISTORY_NAME, LOCK_NAME, OutputFolderLocked, OutputLock
from hidream_ft.trainer import Trainer, run


def adapter_files(out: Path) -> dict:
    """The adapter's config, and its tensors as bytes with the header metadata (whose order varies per write)."""
    weights = out / "adapter" / "adapter_model.safetensors"
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    tensors = {key: (value.dtype, value.shape, value.numpy().tobytes()) for key, value in load_file(weights).items()}
    return {"config": (out / "adapter" / "adapter_config.json").read_text(), "metadata": metadata,
            "tensors": tensors}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo(tmp_path_factory.mktemp("demo"), steps=5)


def train(demo: Path, out: Path, *overrides: str) -> dict:
    """The demo in this process (a one-rank group), constant learning rate, into ``out``."""
    return run(load_config(demo, [f"logging.output_dir='{out}'", "optim.schedule='constant'", "logging.log_every=1",
                                  "checkpoint.every=0", *overrides]))


# -- a finished run --------------------------------------------------------------------------------------------


def test_rerunning_a_finished_run_finds_it_complete_and_restores_a_missing_adapter(demo, tmp_path, capsys):
    out = tmp_path / "out"
    first = train(demo, out, "train.max_steps=5")
    assert sorted(first["history"]) == [1, 2, 3, 4, 5]
    saved = adapter_files(out)

    again = train(demo, out, "train.max_steps=5")
    assert again["history"] == {} and again["step"] == 5
    assert "already complete" in capsys.readouterr().err
    assert adapter_files(out) == saved

    # A crash between the final checkpoint and the adapter: the same command writes the adapter.
    for path in (out / "adapter").iterdir():
        path.unlink()
    (out / "adapter").rmdir()
    train(demo, out, "train.max_steps=5")
    assert adapter_files(out) == saved


def test_a_finished_run_extends_exactly_and_a_stale_adapter_is_replaced(demo, tmp_path, monkeypatch):
    straight = train(demo, tmp_path / "straight", "train.max_steps=8", "checkpoint.every=5")

    out = tmp_path / "out"
    train(demo, out, "train.max_steps=5")
    with monkeypatch.context() as patch:  # the run dies after its final checkpoint, before the adapter
        patch.setattr(Trainer, "save_adapter", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            train(demo, out, "train.max_steps=8")
    again = train(demo, out, "train.max_steps=8")
    assert again["history"] == {}
    assert adapter_files(out) == adapter_files(tmp_path / "straight")

    extended = train(demo, tmp_path / "extended", "train.max_steps=5")
    extended = train(demo, tmp_path / "extended", "train.max_steps=8")
    assert extended["history"] == {step: straight["history"][step] for step in (6, 7, 8)}
    assert adapter_files(tmp_path / "extended") == adapter_files(tmp_path / "straight")


# -- a preemption signal ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("log_every", [1, 3], ids=["logged steps", "unlogged steps"])
def test_a_signal_caught_during_a_steps_forward_stops_the_run_at_the_end_of_that_step(demo, tmp_path, monkeypatch,
                                                                                    log_every):
    import hidream_ft.trainer as trainer_module
    forward = trainer_module.compute_loss_and_terms
    calls = itertools.count(1)

    def signalled_in_step_two(*args):
        if next(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 2, after its votes could have been taken
        return forward(*args)

    monkeypatch.setattr(trainer_module, "compute_loss_and_terms", signalled_in_step_two)
    with pytest.raises(SystemExit) as stopped:
        train(demo, tmp_path / "out", "train.max_steps=5", f"logging.log_every={log_every}")
    assert stopped.value.code == 75
    assert [path.name for path in complete_checkpoints(tmp_path / "out" / "checkpoints")] == ["step-00000002"]


# -- checkpoints cannot run code -------------------------------------------------------------------------------


class _TouchesAFile:
    """Unpickling it runs ``open(path, "w")``: what a crafted checkpoint could run instead."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_rank_files_hold_no_pickle_and_a_crafted_legacy_one_runs_no_code(demo, tmp_path):
    out = tmp_path / "out"
    train(demo, out, "train.max_steps=2")
    step_dir = out / "checkpoints" / "step-00000002"
    rank_file = step_dir / "rank-00000.safetensors"
    with safe_open(rank_file, "pt") as f:
        rng, data_state = f.get_tensor("rng.torch"), json.loads(f.metadata()["data"])
    assert data_state["next_step"] == 2 and not list(step_dir.glob("*.pt"))

    # A checkpoint of an earlier version, whose rank file is a pickle of tensors and containers, still loads.
    rank_file.unlink()
    torch.save({"rng": {"torch": rng}, "data": data_state}, step_dir / "rank-00000.pt")
    assert train(demo, out, "train.max_steps=3")["step"] == 3

    step_dir = out / "checkpoints" / "step-00000003"
    (step_dir / "rank-00000.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(step_dir / "rank-00000.pt", "wb") as f:
        pickle.dump({"rng": {}, "data": _TouchesAFile(marker)}, f, protocol=2)
    with pytest.raises(CheckpointReadError, match="rank-00000.pt: holds more than tensors"):
        train(demo, out, "train.max_steps=4")
    assert not marker.exists()


# -- one writer per output folder ------------------------------------------------------------------------------


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def plant_lock(folder: Path, **fields) -> dict:
    """A lock file as another run would have left it: this host's, unless ``fields`` say otherwise."""
    holder = dict(OutputLock(folder).record, token="planted", **fields)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps(holder))
    return holder


def history(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / HISTORY_NAME).read_text().splitlines()]


def test_a_second_holder_is_refused_with_the_first_named_and_a_released_lock_is_free(tmp_path):
    with OutputLock(tmp_path) as lock:
        with pytest.raises(OutputFolderLocked, match=rf"in use by another run \(host {socket.gethostname()}, "
                                                     rf"pid {os.getpid()}, since "):
            OutputLock(tmp_path).acquire()
        lock.ensure_held()
    assert not (tmp_path / LOCK_NAME).exists()
    with OutputLock(tmp_path):
        pass
    assert [entry["event"] for entry in history(tmp_path)] == ["acquired", "released"] * 2


@pytest.mark.parametrize("holder, reason", [
    ({"pid": "dead"}, "is gone"),
    ({"pid_start": "1"}, "now belongs to another process"),
    ({"boot_id": "another boot"}, "rebooted"),
    ({"host": "elsewhere", "age": 1000}, "no heartbeat for"),
    ({"host": "elsewhere", "job": "77", "restart": "0", "ours": {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}},
     "earlier start of SLURM job 77"),
])
def test_a_dead_holders_lock_is_taken_over(tmp_path, monkeypatch, holder, reason):
    for key, value in holder.pop("ours", {}).items():
        monkeypatch.setenv(key, value)
    age = holder.pop("age", 0)
    if holder.get("pid") == "dead":
        holder["pid"] = dead_pid()
    plant_lock(tmp_path, **holder)
    os.utime(tmp_path / LOCK_NAME, (time.time() - age, time.time() - age))
    with OutputLock(tmp_path):
        pass
    taken = history(tmp_path)[0]["took_over"]
    assert taken["token"] == "planted" and reason in taken["reason"]


def test_a_live_holder_on_another_host_keeps_its_lock_while_its_heartbeat_is_fresh(tmp_path):
    plant_lock(tmp_path, host="elsewhere")
    with pytest.raises(OutputFolderLocked, match="host elsewhere"):
        OutputLock(tmp_path).acquire()


def test_the_heartbeat_refreshes_the_lock_and_a_taken_over_holder_stops_before_writing(tmp_path):
    lock = OutputLock(tmp_path, heartbeat_s=0.05).acquire()
    os.utime(tmp_path / LOCK_NAME, (0, 0))
    wait_for(lambda: (tmp_path / LOCK_NAME).stat().st_mtime > time.time() - 60, "a heartbeat")
    plant_lock(tmp_path, host="elsewhere")  # another host judged this run dead and took the folder
    with pytest.raises(OutputFolderLocked, match=r"taken over by another run \(host elsewhere"):
        lock.ensure_held()
    lock.release()
    assert (tmp_path / LOCK_NAME).exists()  # the new holder's lock stays


def _contend(folder: str, start, results) -> None:
    start.wait()
    try:
        lock = OutputLock(folder).acquire()
    except OutputFolderLocked:
        results.put("refused")
        return
    results.put("won")
    time.sleep(1.0)  # hold it while the others try
    lock.release()


def test_contenders_for_a_stale_lock_produce_one_winner(tmp_path):
    context = multiprocessing.get_context("fork")
    for _ in range(3):
        plant_lock(tmp_path, pid=dead_pid())
        start, results = context.Event(), context.Queue()
        processes = [context.Process(target=_contend, args=(str(tmp_path), start, results)) for _ in range(6)]
        for process in processes:
            process.start()
        start.set()
        for process in processes:
            process.join(30)
        assert sorted(results.get() for _ in processes) == ["refused"] * 5 + ["won"]


ORPHAN = """
import signal, sys, time
from hidream_ft.parallel.distributed import stop_with_launcher
signal.signal(signal.SIGTERM, lambda *_: (open(sys.argv[1], "w").close(), sys.exit(0)))
stop_with_launcher()
print("ready", flush=True)
time.sleep(60)
"""
LAUNCHER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
time.sleep(60)
"""


def test_a_worker_is_asked_to_stop_when_its_launcher_is_killed(tmp_path):
    stopped = tmp_path / "stopped"
    launcher = start_python("-c", LAUNCHER, ORPHAN, stopped, stdout=subprocess.PIPE, text=True)
    assert launcher.stdout.readline() == "ready\n"
    launcher.kill()
    launcher.wait()
    wait_for(stopped.exists, "the orphan's SIGTERM", timeout=10)


def test_a_second_run_on_the_same_folder_fails_with_one_line(demo, tmp_path):
    out = tmp_path / "out"
    with OutputLock(out):
        result = run_python("-m", "hidream_ft.train", "--config", demo, *set_flags(f"logging.output_dir='{out}'"),
                            check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {out} is in use by another run (host ")
    assert not (out / "config.toml").exists() and not (out / "tensorboard").exists()


# -- kill -9 at any moment -------------------------------------------------------------------------------------

CHAOS_STEPS = 14
# Each kill's kind: the launcher and all its processes while a checkpoint is being written ("checkpoint") or
# at a random moment of training ("random"), or the launcher alone, whose workers then stop by themselves.
CHAOS_KILLS = ["checkpoint"] * 5 + ["random"] * 3 + ["launcher"] * 3


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def newest_step(checkpoints: Path) -> int:
    found = complete_checkpoints(checkpoints)
    return int(found[-1].name[len("step-"):]) if found else 0


def check_one_holder_at_a_time(folder: Path) -> list[dict]:
    """Every holder in the lock history took the folder from a holder that released it or was dead."""
    entries = history(folder)
    previous = None
    for entry in entries:
        if entry["event"] == "acquired":
            if previous is not None and previous["event"] == "acquired":  # the holder died without releasing
                assert entry["took_over"]["token"] == previous["token"], entry
                assert "is gone" in entry["took_over"]["reason"], entry
            else:
                assert "took_over" not in entry, entry
        else:
            assert previous["event"] == "acquired" and entry["token"] == previous["token"], entry
        previous = entry
    return entries


@pytest.mark.distributed
def test_kill_9_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path):
    config = write_demo(tmp_path / "demo", steps=CHAOS_STEPS)
    common = ["--config", config, *set_flags("checkpoint.every=1", "checkpoint.keep_last=2", "logging.log_every=1")]

    def launch(out: Path, attempt: int):
        log = open(tmp_path / f"{out.name}-{attempt}.log", "w")
        return start_python("-m", "hidream_ft.train", *common, *set_flags(f"logging.output_dir='{out}'"), nproc=2,
                            stdout=log, stderr=subprocess.STDOUT), log

    straight, log = launch(tmp_path / "straight", 0)
    assert straight.wait(300) == 0, (tmp_path / "straight-0.log").read_text()[-3000:]
    log.close()

    out = tmp_path / "chaos"
    checkpoints = out / "checkpoints"
    rng = random.Random(0)
    kills = rng.sample(CHAOS_KILLS, len(CHAOS_KILLS))
    refused = 0
    hit_a_write = 0
    for attempt in itertools.count():
        launcher, log = launch(out, attempt)
        kind = kills[0] if kills else None

        def holding() -> bool:  # this launch holds the folder (orphans of the last one may still write)
            holder = OutputLock.read(out / LOCK_NAME)
            return holder is not None and holder["pid"] in descendants(launcher.pid)

        wait_for(lambda: launcher.poll() is not None or holding(), f"attempt {attempt} to lock", timeout=300)
        held_since, held_step = time.time(), newest_step(checkpoints)

        def writing() -> bool:  # a checkpoint of this launch is half-written (a killed one may be left over)
            return any(path.stat().st_mtime > held_since for path in checkpoints.glob(".step-*.tmp"))

        def ready() -> bool:
            if launcher.poll() is not None:
                return True
            return writing() if kind == "checkpoint" else kind is not None and newest_step(checkpoints) > held_step

        wait_for(ready, f"attempt {attempt} ({kind})", timeout=300, interval=0.002)
        if launcher.poll() is None:
            if kind == "random":
                time.sleep(rng.uniform(0, 0.3))
            workers = descendants(launcher.pid)
            if kind == "launcher" and not refused:  # the orphans hang on: a restart must fail, not share the folder
                signal_all(workers, signal.SIGSTOP)
            os.kill(launcher.pid, signal.SIGKILL)
            if kind != "launcher":
                signal_all(workers, signal.SIGKILL)
            elif not refused:
                launcher.wait(300)
                rival = run_python("-m", "hidream_ft.train", *common, *set_flags(f"logging.output_dir='{out}'"),
                                   nproc=2, check=False)
                assert rival.returncode != 0 and "is in use by another run" in rival.stderr, rival.stderr[-3000:]
                refused += 1
                signal_all(workers, signal.SIGCONT)
            kills.pop(0)
            hit_a_write += kind == "checkpoint" and writing()
        status = launcher.wait(300)
        log.close()
        text = (tmp_path / f"chaos-{attempt}.log").read_text()
        if status != 0 and "is in use by another run" in text:  # orphans of a killed launcher still stopping
            refused += 1
            time.sleep(0.5)
            continue
        if not kills and status == 0:
            break
        assert status == -signal.SIGKILL, f"attempt {attempt} ({kind}) ended with {status}:\n{text[-3000:]}"

    assert tensorboard_scalars(out, "train/loss") == tensorboard_scalars(tmp_path / "straight", "train/loss")
    assert adapter_files(out) == adapter_files(tmp_path / "straight")
    entries = check_one_holder_at_a_time(out)
    assert sum("took_over" in entry for entry in entries) == CHAOS_KILLS.count("checkpoint") + CHAOS_KILLS.count("random")
    assert not (out / LOCK_NAME).exists()
    assert hit_a_write >= 2 and refused >= 1
    print(f"{attempt + 1} launches, {len(CHAOS_KILLS)} kills ({hit_a_write} with a checkpoint half-written), "
          f"{refused} refused while orphans stopped")
