"""PreemptionHandler: which signal asks for what, handler hand-over, workers ignoring signals, and agreement and
requeue across the two ranks of a submitit job (with a stand-in for the training loop)."""

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import submitit

from helpers import pythonpath_with_tests, run_python, wait_for
from hidream_ft.runtime.preemption import (
    PREEMPTED_EXIT_CODE, PreemptionHandler, ignore_preemption_signals,
)
from launch.jobs import DistributedJob


@pytest.fixture()
def recorded_usr2():
    """A stand-in for submitit's USR2 handler, restored afterwards."""
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGUSR2, previous)


def test_no_signal_means_no_stop(recorded_usr2):
    with PreemptionHandler() as handler:
        assert not handler.should_stop()
        assert not handler.signal_received and not handler.requeue_requested


def test_usr2_asks_for_a_stop_and_a_requeue_handed_to_the_previous_handler(recorded_usr2):
    handler = PreemptionHandler().install()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert handler.signal_received and recorded_usr2 == []  # our handler took it, submitit's did not run
    assert handler.should_stop() and handler.requeue_requested
    with pytest.raises(SystemExit) as exit_info:
        handler.requeue_exit()
    assert exit_info.value.code == PREEMPTED_EXIT_CODE
    assert recorded_usr2 == [signal.SIGUSR2]  # the requeue was handed over, once, after the checkpoint
    assert signal.getsignal(signal.SIGUSR2) is not handler._on_signal  # uninstalled


def test_term_stops_without_requeue(recorded_usr2):
    handler = PreemptionHandler().install()
    os.kill(os.getpid(), signal.SIGTERM)
    assert handler.should_stop() and not handler.requeue_requested
    with pytest.raises(SystemExit) as exit_info:
        handler.requeue_exit()
    assert exit_info.value.code == PREEMPTED_EXIT_CODE
    assert recorded_usr2 == []  # a preempted or cancelled job is not requeued by us


def test_a_requeue_request_outranks_a_stop(recorded_usr2):
    with PreemptionHandler() as handler:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.should_stop() and handler.requeue_requested


def test_votes_summed_elsewhere_decide_the_stop_without_a_collective(recorded_usr2):
    with PreemptionHandler() as handler:
        assert handler.votes() == [0.0, 0.0]
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.votes() == [1.0, 0.0]
        assert not handler.agree([0.0, 0.0]) and not handler.stop_agreed  # the sums do not hold it yet
        assert handler.agree([1.0, 0.0]) and not handler.requeue_requested
        assert handler.agree([0.0, 0.0]) and handler.stop_agreed  # once agreed, it stays
        os.kill(os.getpid(), signal.SIGUSR2)
        assert handler.votes() == [1.0, 1.0]
        assert handler.agree([2.0, 1.0]) and handler.requeue_requested


def test_uninstall_restores_the_previous_handlers(recorded_usr2):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR2)
    with PreemptionHandler():
        assert signal.getsignal(signal.SIGUSR2) is not before[1]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR2)) == before


def test_install_outside_the_main_thread_is_a_clear_error():
    errors = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, PreemptionHandler().install)))
    thread.start()
    thread.join()
    assert "main thread" in str(errors[0].value)


def test_data_loader_workers_survive_the_signals():
    """A process that called ignore_preemption_signals outlives USR2 and TERM (the default would kill it)."""
    code = (
        "import os, signal, sys\n"
        "from hidream_ft.runtime.preemption import ignore_preemption_signals\n"
        "ignore_preemption_signals(worker_id=0)\n"
        "os.kill(os.getpid(), signal.SIGUSR2); os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('alive')\n"
    )
    survived = run_python("-c", code, timeout=60, check=False)
    assert survived.returncode == 0 and survived.stdout.strip() == "alive", survived.stderr
    killed = run_python("-c", code.replace("ignore_preemption_signals(worker_id=0)", ""), timeout=60, check=False)
    assert killed.returncode == -signal.SIGUSR2


def test_ignore_preemption_signals_is_a_worker_init_fn():
    previous = signal.getsignal(signal.SIGUSR2), signal.getsignal(signal.SIGTERM)
    try:
        ignore_preemption_signals(3)
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR2, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


# Across processes.

@pytest.fixture()
def tests_importable(monkeypatch):
    """Job processes import their entry point by name: let them find tests/workers."""
    monkeypatch.setenv("PYTHONPATH", pythonpath_with_tests())


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


@pytest.mark.distributed
def test_a_signal_to_one_rank_stops_all_ranks_at_the_same_step_and_requeues(tmp_path, tests_importable):
    executor = submitit.LocalExecutor(tmp_path / "submitit")
    executor.update_parameters(tasks_per_node=2, gpus_per_node=0, timeout_min=10)
    job = executor.submit(DistributedJob("workers.counting_job:counting_job", str(tmp_path), 40))
    wait_for(lambda: (tmp_path / "rank0-step2").exists() and (tmp_path / "rank1-step2").exists(), "two steps")
    os.kill(task_pids(job)[1], signal.SIGUSR2)  # only rank 1 hears it
    results = job.results()
    stopped_after = json.loads((tmp_path / "state.json").read_text())["step"]
    assert 2 < stopped_after < 40
    # Both ranks were restarted by the requeue and resumed where rank 0's "checkpoint" said.
    assert results == [{"rank": 0, "started_at": stopped_after}, {"rank": 1, "started_at": stopped_after}]
    assert all((tmp_path / f"rank{r}-step{s}").exists() for r in (0, 1) for s in range(40))
