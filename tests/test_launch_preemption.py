"""PreemptionHandler in one process: which signal asks for what, handler hand-over, workers ignoring signals."""

import os
import signal
import subprocess
import sys
import threading

import pytest

from hidream_ft.parallel.preemption import (
    PREEMPTED_EXIT_CODE, PreemptionHandler, ignore_preemption_signals,
)


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
        "from hidream_ft.parallel.preemption import ignore_preemption_signals\n"
        "ignore_preemption_signals(worker_id=0)\n"
        "os.kill(os.getpid(), signal.SIGUSR2); os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('alive')\n"
    )
    survived = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert survived.returncode == 0 and survived.stdout.strip() == "alive", survived.stderr
    killed = subprocess.run([sys.executable, "-c", code.replace("ignore_preemption_signals(worker_id=0)", "")],
                            capture_output=True, text=True, timeout=60)
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
