"""Run as a submitit job by tests/test_launch_preemption.py (entry point ``workers.counting_job:counting_job``):
the shape of the trainer's loop around a PreemptionHandler, with a step counter as the checkpoint."""

import json
import time
from pathlib import Path

from hidream_ft.parallel.distributed import init_distributed, shutdown
from hidream_ft.runtime.preemption import PreemptionHandler


def counting_job(out_dir: str, steps: int) -> dict:
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
