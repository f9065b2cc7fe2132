"""LoRAs at sampling time: adapters applied without touching the base weights, and their column labels.

Adapters are applied as forward hooks that add Σ wᵢ·scaleᵢ·Bᵢ(Aᵢ x) to each targeted linear's output, and
for the other kinds (DoRA, LoHa, LoKr) Σ wᵢ·ΔWᵢ x with ΔW rebuilt from the adapter's tensors at each call, so
that no weight-sized copy is held. The base weights stay exact (no bf16 merge rounding), adapters of any
kinds stack, and leaving the ``with`` block restores the base model: one loaded model serves every column of
a comparison grid.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hidream_ft.lora.adapter import AdapterModule, LoraAdapter, check_fits, stack_adapters


def _add_low_rank(down: torch.Tensor, up: torch.Tensor, module: nn.Module, args, output: torch.Tensor):
    return output + F.linear(F.linear(args[0], down), up)


def _add_updates(updates: list[tuple[AdapterModule, float]], module: nn.Module, args, output: torch.Tensor):
    weight = module.weight
    delta = sum(w * adapter_module.delta(weight) for adapter_module, w in updates)
    return output + F.linear(args[0], delta.to(weight.dtype))


@contextlib.contextmanager
def lora_applied(model: nn.Module, weighted: Sequence[tuple[LoraAdapter, float]]):
    """Run the block with every (adapter, weight) added to ``model``'s linears; no-op for an empty list."""
    if not weighted:
        yield model
        return
    shapes = {name: p.shape for name, p in model.named_parameters()}
    for adapter, _ in weighted:
        check_fits(adapter, shapes, "the model")
    low_rank = [(adapter, weight) for adapter, weight in weighted if adapter.kind == "lora"]
    updates: dict[str, list[tuple[AdapterModule, float]]] = defaultdict(list)  # the other kinds, per module
    for adapter, weight in weighted:
        if adapter.kind != "lora":
            for path, module in adapter.modules.items():
                updates[path].append((module.to(model.get_submodule(path).weight.device), weight))
    handles = []
    try:
        for path, module in (stack_adapters(low_rank).modules.items() if low_rank else ()):
            linear = model.get_submodule(path)
            weight = linear.weight
            down = module.down.to(weight.device, weight.dtype)
            up = (module.scale * module.up.float()).to(weight.device, weight.dtype)
            handles.append(linear.register_forward_hook(partial(_add_low_rank, down, up)))
        for path, found in updates.items():
            handles.append(model.get_submodule(path).register_forward_hook(partial(_add_updates, found)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def lora_label(path: str | Path, weight: float) -> str:
    """A short column label: the adapter's name (a run's name for its adapter/ or step-N/), and its weight."""
    path = Path(path)
    if path.name.startswith("step-") and path.parent.name == "checkpoints":
        name = f"{path.parent.parent.name}@{path.name[len('step-'):].lstrip('0') or '0'}"
    elif path.name == "adapter":
        name = path.parent.name
    else:
        name = path.stem or path.name
    return name if weight == 1.0 else f"{name} x{weight:g}"
