"""What runs inside each task of a submitit job: a torchrun-style environment, then the entry point in-process.

submitit starts one process per task (``srun`` on SLURM, subprocesses locally). Each one sets the variables
torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) from
:class:`submitit.JobEnvironment` and calls the entry point, which initialises the process group from them.
"""

from __future__ import annotations

import importlib
import os
import socket
import zlib
from typing import Any

import submitit

TRAIN_ENTRYPOINT = "hidream_ft.train:main"
CHECK_ENTRYPOINT = "launch.jobs:all_reduce_check"


def master_port(job_id: str) -> int:
    """A port in 20000–39999 derived from the job id: the same on every task, different for jobs sharing a node.

    A requeued job keeps its id and so its port.
    """
    return 20000 + zlib.crc32(job_id.encode()) % 20000


def distributed_env(job: submitit.JobEnvironment) -> dict[str, str]:
    """The torchrun variables for this task, from submitit's view of the SLURM (or local) job."""
    per_node = job.num_tasks // job.num_nodes
    # One node: loopback, which works even where the host name does not resolve (laptops, containers).
    master = job.hostnames[0] if job.num_nodes > 1 else "127.0.0.1"
    return {
        "RANK": str(job.global_rank),
        "WORLD_SIZE": str(job.num_tasks),
        "LOCAL_RANK": str(job.local_rank),
        "LOCAL_WORLD_SIZE": str(per_node),
        "MASTER_ADDR": master,
        "MASTER_PORT": str(master_port(job.job_id)),
    }


def resolve(entrypoint: str):
    module, _, name = entrypoint.partition(":")
    return getattr(importlib.import_module(module), name)


class DistributedJob(submitit.helpers.Checkpointable):
    """``entrypoint(*args)`` in every task, with the distributed environment set up first.

    Checkpointable: when submitit requeues the job after a time-limit warning it resubmits this same object,
    and the trainer's ``checkpoint.resume = "auto"`` continues from the newest complete checkpoint.
    An entry point that returns a non-zero int (a CLI exit status) fails the job.
    """

    def __init__(self, entrypoint: str, *args: Any):
        self.entrypoint = entrypoint
        self.args = args

    def __call__(self) -> Any:
        os.environ.update(distributed_env(submitit.JobEnvironment()))
        result = resolve(self.entrypoint)(*self.args)
        if isinstance(result, int) and not isinstance(result, bool) and result != 0:
            raise RuntimeError(f"{self.entrypoint} exited with status {result} (its error is in this task's log)")
        return result

    def __repr__(self) -> str:
        return f"DistributedJob({self.entrypoint!r}, {', '.join(map(repr, self.args))})"


def all_reduce_check() -> dict:
    """Form the process group exactly as the trainer does and all-reduce each rank's ``rank + 1``.

    A quick test of a cluster's wiring (rendezvous, network, backend) before a long training job.
    """
    import torch
    import torch.distributed as dist

    from hidream_ft.parallel.distributed import init_distributed, shutdown

    env = init_distributed()
    try:
        value = torch.tensor([float(env.rank + 1)], device=env.device)
        dist.all_reduce(value)
        expected = env.world_size * (env.world_size + 1) / 2
        if value.item() != expected:
            raise RuntimeError(f"all_reduce gave {value.item()}, expected {expected} over {env.world_size} ranks")
        return {"rank": env.rank, "world_size": env.world_size, "backend": dist.get_backend(),
                "host": socket.gethostname(), "sum": value.item()}
    finally:
        shutdown()
