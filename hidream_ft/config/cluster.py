"""Cluster resources and policies of ``python -m launch.submit``: the ``[slurm]`` section (docs/cluster.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hidream_ft.config.toml import ConfigError

# Keys of [slurm] that have their own field here; `slurm.sbatch` may not set them behind the launcher's back.
_MANAGED_SBATCH_OPTIONS = {
    "nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "partition", "account", "qos", "time",
    "constraint", "mem", "exclusive", "job-name", "signal", "requeue", "array", "dependency", "output", "error",
    "open-mode",
}


@dataclass
class SlurmConfig:
    """Resources and policies for ``python -m launch.submit`` (docs/cluster.md)."""

    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int = 0  # 0: one task per GPU (one task when gpus_per_node = 0)
    cpus_per_task: int = 0  # 0: the cluster's default
    partition: str = ""
    account: str = ""
    qos: str = ""
    time_min: int = 1440
    constraint: str = ""
    mem: str = ""
    exclusive: bool = False
    job_name: str = "hidream-ft"
    signal_delay_s: int = 120
    max_timeouts: int = 3
    array_parallelism: int = 16
    folder: str = ""
    setup: list[str] = field(default_factory=list)
    srun_args: list[str] = field(default_factory=list)
    sbatch: dict[str, Any] = field(default_factory=dict)
    export_gpus: int = 1
    export_time_min: int = 60

    def validate(self, where: str) -> None:
        at_least = {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 0, "cpus_per_task": 0, "time_min": 1,
                    "signal_delay_s": 0, "max_timeouts": 0, "array_parallelism": 1, "export_gpus": 0,
                    "export_time_min": 1}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ConfigError(f"{where}.{name}: must be ≥ {low}, got {getattr(self, name)}")
        if self.signal_delay_s >= self.time_min * 60:
            raise ConfigError(f"{where}.signal_delay_s: {self.signal_delay_s} s leaves no run time within "
                              f"time_min = {self.time_min} min")
        for key, value in self.sbatch.items():
            if key.replace("_", "-") in _MANAGED_SBATCH_OPTIONS:
                raise ConfigError(f"{where}.sbatch.{key}: set by the launcher; use the slurm.* key of that name")
            if not isinstance(value, (str, int, bool)):
                raise ConfigError(f"{where}.sbatch.{key}: expected a string, integer or boolean, got {value!r}")

    @property
    def tasks(self) -> int:
        """Tasks (training processes) per node."""
        return self.tasks_per_node or max(1, self.gpus_per_node)
