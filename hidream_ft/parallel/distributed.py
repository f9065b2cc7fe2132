"""Process group and device mesh from the torchrun / SLURM environment.

A plain ``python -m hidream_ft.train`` runs as a one-rank group, so single-process and multi-process runs
take the same code path (a one-rank mesh, on which the model is left unsharded).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from hidream_ft.config import ConfigError


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# What the kernel sends a torchrun worker when the launcher dies (Linux): a signal of its own, turned into one
# SIGTERM. Elsewhere the watchdog thread alone notices.
LAUNCHER_DIED_SIGNAL = signal.SIGRTMIN + 2 if hasattr(signal, "SIGRTMIN") else None
# How long an orphaned worker may take to checkpoint and exit after its launcher died.
ORPHAN_GRACE_S = 120.0


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_with_launcher() -> None:
    """Stop this worker when its launcher dies: torchrun starts workers in sessions of their own, so after a
    ``kill -9`` of torchrun alone they would train on as orphans, holding the output folder. The worker then
    sends itself SIGTERM (a stop with a checkpoint, like a preemption), once; a watchdog thread does the same
    where the kernel cannot tell, and kills the process if it has not ended ``ORPHAN_GRACE_S`` later. Call it
    from the main thread."""
    launcher = os.getppid()
    signalled_by_kernel = False
    if LAUNCHER_DIED_SIGNAL is not None:
        signal.signal(LAUNCHER_DIED_SIGNAL, _on_launcher_death)
        # prctl is variadic: the signal must be passed as the unsigned long the kernel reads, or its upper
        # bits are whatever the register held.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        signalled_by_kernel = prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(LAUNCHER_DIED_SIGNAL)) == 0
    threading.Thread(target=_watch_launcher, args=(launcher, signalled_by_kernel), name="launcher-watchdog",
                     daemon=True).start()


def _on_launcher_death(signum: int, frame: object) -> None:
    # The kernel sends the parent-death signal again each time the orphan is handed to another of the dying
    # launcher's threads; a SIGTERM arriving after the stop had begun would end the process before its cleanup.
    signal.signal(signum, signal.SIG_IGN)
    os.kill(os.getpid(), signal.SIGTERM)


def _watch_launcher(launcher: int, signalled_by_kernel: bool) -> None:
    while os.getppid() == launcher:
        time.sleep(1.0)
    if not signalled_by_kernel:
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(ORPHAN_GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)


def init_distributed() -> DistEnv:
    """Initialise the default process group (NCCL on GPU, gloo on CPU) from RANK/WORLD_SIZE/... variables."""
    if "TORCHELASTIC_RUN_ID" in os.environ and not dist.is_initialized():  # a torchrun worker, first call
        stop_with_launcher()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world, device_id=device if backend == "nccl" else None)
    return DistEnv(rank, world, local_rank, local_world, device)


def build_mesh(env: DistEnv, hsdp: bool, replicate: bool = False) -> DeviceMesh:
    """1-D sharding mesh, or 2-D (replicate across nodes × shard within a node) for HSDP, or with
    ``replicate`` 2-D with shards of one rank: every rank holds whole parameters."""
    device_type = env.device.type
    if replicate:
        return init_device_mesh(device_type, (env.world_size, 1), mesh_dim_names=("replicate", "shard"))
    if not hsdp or env.world_size == env.local_world_size:
        return init_device_mesh(device_type, (env.world_size,), mesh_dim_names=("shard",))
    if env.world_size % env.local_world_size:
        raise ConfigError(f"parallel.hsdp needs equal ranks per node: world {env.world_size}, per node "
                          f"{env.local_world_size}; launch as many ranks on every node, or set parallel.hsdp = false")
    shape = (env.world_size // env.local_world_size, env.local_world_size)
    return init_device_mesh(device_type, shape, mesh_dim_names=("replicate", "shard"))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
