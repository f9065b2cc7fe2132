"""Process group and device mesh from the torchrun / SLURM environment.

A plain ``python -m hidream_ft.train`` runs as a one-rank group, so single-process and multi-process runs
take exactly the same code path (FSDP on a mesh of one).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


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


def init_distributed() -> DistEnv:
    """Initialise the default process group (NCCL on GPU, gloo on CPU) from RANK/WORLD_SIZE/... variables."""
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


def build_mesh(env: DistEnv, hsdp: bool) -> DeviceMesh:
    """1-D sharding mesh, or 2-D (replicate across nodes × shard within a node) for HSDP."""
    device_type = env.device.type
    if not hsdp or env.world_size == env.local_world_size:
        return init_device_mesh(device_type, (env.world_size,), mesh_dim_names=("shard",))
    if env.world_size % env.local_world_size:
        raise ValueError(f"HSDP needs equal ranks per node: world {env.world_size}, per node {env.local_world_size}")
    shape = (env.world_size // env.local_world_size, env.local_world_size)
    return init_device_mesh(device_type, shape, mesh_dim_names=("replicate", "shard"))


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True only when ``flag`` holds on every rank (one tiny all-reduce)."""
    value = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item() == 0.0


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
