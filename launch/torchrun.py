"""``torchrun`` for the slurm/*.sbatch scripts: same arguments, but a run stopped by a preemption signal ends
quietly with the requeue status (75) instead of a traceback and status 1, so SLURM records a preemption, not a
failure. Any other failure keeps torchrun's report and status."""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun

from hidream_ft.runtime.preemption import PREEMPTED_EXIT_CODE, REQUEUE_SIGNAL, STOP_SIGNAL

_PREEMPTION_SIGNALS = {REQUEUE_SIGNAL, STOP_SIGNAL}


def main(argv: list[str] | None = None) -> int:
    try:
        torchrun(argv)
    except SignalException as e:
        # torchrun itself was signalled: it has passed the signal to the workers and waited for them to
        # checkpoint and exit (TORCH_ELASTIC_SHUTDOWN_TIMEOUT).
        if e.sigval not in _PREEMPTION_SIGNALS:
            raise
        print(f"torchrun: workers stopped on {e.sigval.name}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except ChildFailedError as e:
        # The workers heard the signal first and all exited with the requeue status after their checkpoint.
        if any(failure.exitcode != PREEMPTED_EXIT_CODE for failure in e.failures.values()):
            raise
        print(f"torchrun: workers stopped for a requeue (status {PREEMPTED_EXIT_CODE})", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
