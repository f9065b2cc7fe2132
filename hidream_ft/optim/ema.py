"""An exponential moving average of the trainable parameters, kept in fp32 and sharded like them.

Each EMA tensor lives on the device beside its parameter, with the parameter's sharding (a DTensor of the same
mesh and placements under FSDP2), so an update touches this rank's shards only and gathers nothing. The update
runs entirely on the device: whether the optimizer skipped the step is a device flag, never read on the host.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.distributed.tensor import DTensor

EMA_ADAPTER_DIR = "adapter-ema"  # a LoRA run's final average, a PEFT folder beside its adapter/
# Wrappers that activation checkpointing and torch.compile put into parameter names; state-dict keys omit them.
WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_orig_mod")


def state_dict_key(name: str) -> str:
    """A parameter's name as the model's state dict spells it (wrapper segments removed)."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def ema_decay(decay: float, updates: torch.Tensor, warmup: bool) -> torch.Tensor:
    """The decay of the next update: ``decay``, or with ``warmup`` min(decay, (1 + n) / (10 + n)) for the n
    updates applied so far, so the first updates follow the weights closely instead of the initial ones.
    On ``updates``' device, with ``decay`` a kernel argument (no copy from the host)."""
    n = updates.to(torch.float32)
    return ((1 + n) / (10 + n)).clamp(max=decay) if warmup else torch.full_like(n, decay)


def lerp_weight(decay: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """How far the average moves toward the weights: 1 - decay, or 0 on a step the optimizer skipped."""
    return torch.where(skip, torch.zeros_like(decay), 1 - decay)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _fp32_like(param: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of ``param``'s values with its sharding: this rank's shard, wrapped like the parameter."""
    local = _local(param).detach().to(torch.float32, copy=True)
    if isinstance(param, DTensor):
        return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape,
                                  stride=param.stride(), run_check=False)
    return local


class ParamEma:
    """The average of ``params`` (name → parameter, names as in the model's state dict)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float, warmup: bool):
        self.params = params
        self.decay, self.warmup = decay, warmup
        device = next(iter(params.values())).device
        self.averages = {name: _fp32_like(param) for name, param in params.items()}
        self.updates = torch.zeros((), dtype=torch.int64, device=device)  # updates applied (skipped ones not)
        self._local_averages = [_local(average) for average in self.averages.values()]

    def _local_params(self) -> list[torch.Tensor]:
        # Taken anew each time: FSDP may give a parameter new local storage (when a state dict is assigned).
        return [_local(param) for param in self.params.values()]

    @classmethod
    def of_trainable(cls, model: torch.nn.Module, decay: float, warmup: bool) -> ParamEma:
        params = {state_dict_key(name): param for name, param in model.named_parameters() if param.requires_grad}
        return cls(params, decay, warmup)

    @torch.no_grad()
    def update(self, skip: torch.Tensor) -> None:
        """Move the average toward the current weights, unless the device flag ``skip`` is set."""
        # A no-op but where FSDP keeps the parameters in host memory (parallel.offload), whose step waits anyway.
        skip = skip.to(self.updates.device)
        weight = lerp_weight(ema_decay(self.decay, self.updates, self.warmup), skip)
        # The fp32 view of fp32 weights is the weights themselves; bf16 weights are widened first.
        targets = [param.to(torch.float32) for param in self._local_params()]
        torch._foreach_lerp_(self._local_averages, targets, [weight] * len(targets))
        self.updates += ~skip

    @torch.no_grad()
    def restart(self) -> None:
        """Start the average again from the current weights."""
        torch._foreach_copy_(self._local_averages, self._local_params())
        self.updates.zero_()

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The parameters hold the average (rounded to their dtype) inside the block and exactly their own
        values again after it."""
        params = self._local_params()
        with torch.no_grad():
            kept = [param.clone() for param in params]
            torch._foreach_copy_(params, self._local_averages)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, kept)

    def state_dict(self) -> dict:
        """The averages (DTensors where the parameters are: a checkpoint of them reshards) and the update count.
        Loading into these tensors in place restores the average."""
        return {"weights": self.averages, "updates": self.updates}
