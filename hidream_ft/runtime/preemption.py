"""Stop cleanly when SLURM is about to take the job away (SIGUSR2 / SIGTERM) or on Ctrl-C (SIGINT), on every rank
at the same step; which signal means what, who requeues, and how the trainer uses this are in docs/cluster.md."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any, NoReturn

import torch
import torch.distributed as dist

REQUEUE_SIGNAL = signal.SIGUSR2
STOP_SIGNAL = signal.SIGTERM
# Ctrl-C stops like SIGTERM; a second one aborts at once. In a terminal under torchrun a worker gets the first
# Ctrl-C twice, from the terminal and forwarded by the launcher, so only one at least this much later aborts.
INTERRUPT_SIGNAL = signal.SIGINT
ABORT_AFTER_S = 1.0
# EX_TEMPFAIL from sysexits.h: the work is unfinished and may be retried.
PREEMPTED_EXIT_CODE = 75

# Levels all-reduced with MAX: a requeue request from any rank wins over a plain stop.
_RUN, _STOP, _REQUEUE = 0, 1, 2
_LEVEL_OF_SIGNAL = {STOP_SIGNAL: _STOP, INTERRUPT_SIGNAL: _STOP, REQUEUE_SIGNAL: _REQUEUE}


def ignore_preemption_signals(worker_id: int | None = None) -> None:
    """Make this process ignore the preemption signals; usable as (or from) a DataLoader ``worker_init_fn``.

    Only the training processes act on the signals; a worker that ignores them keeps serving batches until the
    main process has checkpointed and shuts the loader down.
    """
    for signum in _LEVEL_OF_SIGNAL:
        signal.signal(signum, signal.SIG_IGN)


def _collective_device() -> torch.device:
    """NCCL reduces only CUDA tensors; every other backend takes CPU tensors."""
    if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class PreemptionHandler:
    """Records SIGUSR2 / SIGTERM / SIGINT and turns them into one agreed stop decision across ranks.

    ``device`` is where the one-integer all-reduce runs (the trainer's device); by default the current CUDA
    device with NCCL, else the CPU.
    """

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self._received = _RUN
        self._agreed = _RUN
        self._previous: dict[int, Any] = {}
        self._interrupted_at: float | None = None

    def install(self) -> PreemptionHandler:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler.install() must run in the main thread (Python delivers "
                               "signals only there)")
        for signum in _LEVEL_OF_SIGNAL:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Give the signals back to the handlers that owned them before :meth:`install`."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == INTERRUPT_SIGNAL:
            if self._interrupted_at is not None:
                if time.monotonic() - self._interrupted_at >= ABORT_AFTER_S:
                    signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt
                return
            self._interrupted_at = time.monotonic()
        self._received = max(self._received, _LEVEL_OF_SIGNAL[signum])
        rank = os.environ.get("RANK", "0")
        again = " (Ctrl-C again to abort without a checkpoint)" if signum == INTERRUPT_SIGNAL else ""
        # os.write, not print: a handler that prints while the loop prints raises "reentrant call".
        os.write(2, f"[rank {rank}] caught {signal.Signals(signum).name}: checkpointing and stopping at the end "
                    f"of this step{again}\n".encode())

    @property
    def signal_received(self) -> bool:
        """Whether this process caught a preemption signal (no communication; use :meth:`should_stop` to act)."""
        return self._received != _RUN

    @property
    def requeue_requested(self) -> bool:
        """Whether the agreed stop is a time-limit/preemption warning (USR2) that asks for a requeue."""
        return self._agreed == _REQUEUE

    def should_stop(self) -> bool:
        """True on every rank as soon as any rank caught a signal; a collective: call it on all ranks alike."""
        level = self._received
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([level], dtype=torch.int32, device=self.device or _collective_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            level = int(flag.item())
        return self._settle(level)

    def votes(self) -> list[float]:
        """This rank's (stop, requeue) requests as 0/1 numbers, for a caller that sums them across ranks in a
        collective it makes anyway (the trainer's loss all-reduce); :meth:`agree` takes the sums."""
        return [float(self._received >= _STOP), float(self._received == _REQUEUE)]

    def agree(self, summed_votes: Sequence[float]) -> bool:
        """:meth:`should_stop` without a collective of its own: from the sums of every rank's :meth:`votes`, so
        ranks that read the same sums stop at the same step."""
        stops, requeues = summed_votes
        return self._settle(_REQUEUE if requeues else _STOP if stops else _RUN)

    @property
    def stop_agreed(self) -> bool:
        """Whether the ranks have agreed to stop (through :meth:`should_stop` or :meth:`agree`)."""
        return self._agreed != _RUN

    def _settle(self, agreed_level: int) -> bool:
        self._agreed = max(self._agreed, agreed_level)
        return self.stop_agreed

    def requeue_exit(self) -> NoReturn:
        """After the checkpoint: requeue the job when USR2 asked for it, then exit with PREEMPTED_EXIT_CODE.

        Call it on every rank. The barrier makes sure no rank requeues (which makes SLURM kill the job) while
        another is still writing its checkpoint shards.
        """
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        previous = self._previous.get(REQUEUE_SIGNAL)
        self.uninstall()
        if self.requeue_requested and callable(previous):
            # submitit's handler: on rank 0 it dumps the resubmission, requeues and exits; elsewhere it returns.
            previous(REQUEUE_SIGNAL, None)
        sys.exit(PREEMPTED_EXIT_CODE)
