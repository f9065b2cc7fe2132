"""Plan a training run before renting a GPU: per-rank memory, FLOPs, communication and a step-time lower bound.

    python -m hidream_ft.plan --config configs/lora.toml [--set key=value ...] [--gpus 8] [--gpu h100]

One training step (forward, backward, clipping, optimizer step) of the configured run runs on fake tensors —
no weights, no compute, no GPU — at the 8B shape, sharded for ``--gpus`` ranks over a fake process group, under
torch's memory tracker and FLOP counter. Exit status 0: the run FITS the GPU; 3: it DOES NOT FIT.
What is counted, and what is not, is in docs/planning.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import unittest.mock
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch._subclasses import fake_tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._sharding_prop import ShardingPropagator
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from hidream_ft.bench import SHAPES, synthetic_batch, write_shape_dir
from hidream_ft.cli import entry_point, int_at_least
from hidream_ft.config import Config, load_config, toml_literal
from hidream_ft.data.buckets import resolve_stages
from hidream_ft.errors import UserError
from hidream_ft.model.dtypes import TORCH_DTYPES
from hidream_ft.model.loading import load_model
from hidream_ft.model.patches import PATCH_SIZE
from hidream_ft.optim import fused_kernel
from hidream_ft.optim.adamw8bit import ShardedAdamW8bit
from hidream_ft.parallel.distributed import DistEnv
from hidream_ft.trainer import Trainer

DOES_NOT_FIT_STATUS = 3  # distinct from a user error (2) and a crash (1)
GIB = 2**30
# Fake tensors of up to this many elements made from data keep their values (torch's default: 1).
CONSTANT_NUMEL_LIMIT = 4096


@dataclass(frozen=True)
class GPU:
    """Datasheet figures (dense, no sparsity) and the assumed links; bandwidths per direction."""

    name: str
    bf16_tflops: float
    hbm_gb_s: float
    memory_gb: float  # datasheet GB (10⁹ bytes)
    intra_node_gb_s: float  # NVLink (or PCIe where there is none), per GPU per direction
    inter_node_gb_s: float  # assumed network: one NIC per GPU, per direction

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)


GPUS = {
    "h100": GPU("H100 SXM 80GB", 989.4, 3350, 80, 450, 50),  # NVLink 4 900 GB/s total; 400 Gb/s NDR NIC
    "h200": GPU("H200 SXM 141GB", 989.4, 4800, 141, 450, 50),  # same die and links as H100, HBM3e
    "a100": GPU("A100 SXM 80GB", 312, 2039, 80, 300, 25),  # NVLink 3 600 GB/s total; 200 Gb/s HDR NIC
    "l40s": GPU("L40S", 362, 864, 48, 32, 25),  # no NVLink: PCIe 4.0 x16; 200 Gb/s NIC
    "4090": GPU("RTX 4090", 165, 1008, 24, 32, 12.5),  # bf16 with fp32 accumulate; PCIe 4.0 x16; 100 Gb/s NIC
}


def _flash_attention_cpu_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _flash_attention_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# Fake tensors live on the CPU (a CPU build of torch cannot autograd through fake CUDA tensors), where SDPA
# picks the CPU flash kernel: same saved tensors (output + log-sum-exp) as the CUDA flash kernel, but the FLOP
# counter only knows the CUDA kernels' names. Causal masking is not discounted, as in torch's own formulas.
SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _flash_attention_cpu_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _flash_attention_cpu_backward_flops,
}


@dataclass(frozen=True)
class Unit:
    """One FSDP unit: its parameters' global shapes, and whether a step all-gathers it in forward / backward."""

    name: str
    gathered: tuple[torch.Size, ...]  # every parameter, all-gathered in the param dtype
    trainable: tuple[torch.Size, ...]  # parameters with gradients, reduce-scattered in the reduce dtype
    in_forward: bool
    in_backward: bool  # all-gathered again in backward (see UnitObserver)

    def gathered_bytes(self, shards: int, itemsize: int) -> int:
        return itemsize * sum(padded_numel(shape, shards) for shape in self.gathered)

    def trainable_bytes(self, shards: int, itemsize: int) -> int:
        return itemsize * sum(padded_numel(shape, shards) for shape in self.trainable)


@dataclass(frozen=True)
class Communication:
    """Collectives of one step, per rank: buffer sizes, and the bytes each rank receives over each link."""

    all_gather_bytes: int  # unsharded all-gather outputs
    reduce_scatter_bytes: int  # unsharded reduce-scatter inputs
    all_reduce_bytes: int  # HSDP: the gradient shards all-reduced across replicas
    intra_node_received: float  # over NVLink / PCIe
    inter_node_received: float  # over the network

    def seconds(self, gpu: GPU) -> float:
        return (self.intra_node_received / (gpu.intra_node_gb_s * 1e9)
                + self.inter_node_received / (gpu.inter_node_gb_s * 1e9))


def padded_numel(shape: torch.Size, shards: int) -> int:
    """FSDP2 pads dim 0 to a multiple of the shard count; its collectives move the padded size."""
    if not shape:
        return shards
    return math.ceil(shape[0] / shards) * shards * math.prod(shape[1:])


def communication(units: list[Unit], world: int, per_node: int, hsdp: bool, micro_batches: int,
                  param_itemsize: int, reduce_itemsize: int) -> Communication:
    """The bytes FSDP2 moves in one step, per rank, with ring collectives.

    Each unit is all-gathered at every forward that uses it and again in backward when it was resharded:
    ``micro_batches`` times per step. Gradients are reduce-scattered once per step (the last micro-batch). A
    ring all-gather or reduce-scatter over ``n`` ranks moves (n−1)/n of the buffer into each rank. Plain FSDP
    shards over all ``world`` ranks, so once they span nodes every ring crosses the network; HSDP shards within a
    node (``per_node`` ranks) and all-reduces each rank's gradient shard across the ``world / per_node``
    replicas: 2(r−1)/r of the shard per rank, over the network."""
    group = per_node if hsdp and world > per_node else world
    replicas = world // group
    all_gather = micro_batches * sum(u.gathered_bytes(group, param_itemsize) * (u.in_forward + u.in_backward)
                                     for u in units)
    reduce_scatter = sum(u.trainable_bytes(group, reduce_itemsize) for u in units)
    all_reduce = reduce_scatter // group if replicas > 1 else 0
    sharded = (all_gather + reduce_scatter) * (group - 1) / group
    replicated = all_reduce * 2 * (replicas - 1) / replicas
    if group > per_node:
        return Communication(all_gather, reduce_scatter, all_reduce, 0.0, sharded + replicated)
    return Communication(all_gather, reduce_scatter, all_reduce, sharded, replicated)


class CollectiveCounter(TorchDispatchMode):
    """The buffers of the collectives a step really issues (the check of :func:`communication`): FSDP2's
    all-gather outputs and reduce-scatter inputs, and every all-reduced tensor."""

    def __init__(self):
        super().__init__()
        self.all_gather_bytes = self.reduce_scatter_bytes = self.all_reduce_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.c10d._allgather_base_.default:
            self.all_gather_bytes += _tensor_bytes(args[0])
        elif func is torch.ops.c10d._reduce_scatter_base_.default:
            self.reduce_scatter_bytes += _tensor_bytes(args[1])
        elif func is torch.ops.c10d.allreduce_.default:
            self.all_reduce_bytes += sum(_tensor_bytes(t) for t in args[0])
        return func(*args, **(kwargs or {}))


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def fsdp_units(root: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, list[torch.nn.Parameter]]]:
    """FSDP unit name → (module, the parameters it shards itself, not those of units nested in it; parameters
    FSDP leaves alone, e.g. a frozen ViT's, are plain tensors rather than DTensors)."""
    units = {name: (module, []) for name, module in root.named_modules() if isinstance(module, FSDPModule)}
    claimed = set()
    for name in sorted(units, key=lambda n: n.count(".") + bool(n), reverse=True):  # innermost first
        module, params = units[name]
        for param in module.parameters():
            if isinstance(param, DTensor) and id(param) not in claimed:
                claimed.add(id(param))
                params.append(param)
    return units


def _resharded_after_forward(module: FSDPModule) -> bool:
    group = module._get_fsdp_state()._fsdp_param_group
    return group is not None and group.post_forward_mesh_info is not None


class UnitObserver:
    """Which FSDP units a step all-gathers: every unit that runs forward; in backward, each resharded unit
    that backward runs through (its output needs a gradient) and, as FSDP2 prefetches the unit that ran before
    one in forward, each resharded unit just before such a unit in forward order."""

    def __init__(self, root: torch.nn.Module):
        self.units = fsdp_units(root)
        self.forward_order: list[str] = []
        self.backward: set[str] = set()
        self.handles = [module.register_forward_hook(self._hook(name)) for name, (module, _) in self.units.items()]

    def _hook(self, name: str):
        def record(module, args, output):
            if name not in self.forward_order:
                self.forward_order.append(name)
            outputs = output if isinstance(output, (tuple, list)) else [output]
            if any(isinstance(t, torch.Tensor) and t.requires_grad for t in outputs):
                self.backward.add(name)
        return record

    def result(self) -> list[Unit]:
        for handle in self.handles:
            handle.remove()
        order = self.forward_order
        prefetched = {order[i - 1] for i, name in enumerate(order) if name in self.backward and i > 0}
        return [Unit(name, tuple(p.shape for p in params), tuple(p.shape for p in params if p.requires_grad),
                     name in order,
                     name in self.backward | prefetched and _resharded_after_forward(module))
                for name, (module, params) in self.units.items()]


def local_bytes(tensors) -> int:
    """Bytes this rank holds: the local shard of a DTensor, the whole of a plain tensor."""
    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return local_bytes(v for state in optimizer.state.values() for v in state.values()
                       if isinstance(v, torch.Tensor) and v.dim() > 0)


class MemoryTracker(MemTracker):
    """torch's memory tracker of every live tensor storage, keeping the device peak only.

    Two of its per-module extras are dropped: gradient hooks on every parameter (a frozen one refuses them;
    gradients are still counted, as every allocation is, in the backward pass's category) and per-module
    peaks (a pass over every module at every op: hours at the 8B shape). And it ignores DTensor's sharding
    propagation, which runs an op on global-shape fake tensors in the active fake mode — ours — to learn its
    output shapes (in the optimizer step: four unsharded copies of the trained parameters that a GPU never
    holds). torch serialises that propagation with ``ShardingPropagator._fake_mode_lock``, a context manager
    this tracker replaces while it runs."""

    def __init__(self):
        super().__init__()
        self.propagating = 0

    def __enter__(self):
        self._lock = unittest.mock.patch.object(ShardingPropagator, "_fake_mode_lock", _Propagation(self))
        self._lock.start()
        return super().__enter__()

    def __exit__(self, *args):
        try:
            return super().__exit__(*args)
        finally:
            self._lock.stop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.propagating:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    def _update_peak_stats(self, peak_state) -> None:
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot["Total"]:
                self._peak_mem[device] = snapshot["Total"]
                self._peak_mem_snap[device] = dict(snapshot)


class _Propagation:
    """Stands in for DTensor's propagation lock: the tracker ignores what runs inside."""

    def __init__(self, tracker: MemoryTracker):
        self.tracker = tracker

    def __enter__(self):
        self.tracker.propagating += 1

    def __exit__(self, *args):
        self.tracker.propagating -= 1


@dataclass
class StepMeasurement:
    """What one step of a built trainer used on this rank (fake or real tensors alike)."""

    parameter_bytes: int
    gradient_bytes: int  # sharded gradients of the trainable parameters, held from backward to the step
    optimizer_bytes: int
    peak_bytes: int
    peak_breakdown: dict[str, int]  # the memory tracker's categories at the peak
    flops: int
    units: list[Unit]
    traced: CollectiveCounter


def _kernel_update_in_place(*args, **kwargs) -> None:
    """Stands in for the 8-bit AdamW's Triton kernel, which reads and writes weights and state in place and
    allocates nothing but a pointer table of 9 int64 per parameter."""


def gpu_optimizer_kernel() -> ExitStack:
    """The 8-bit AdamW updating as on a GPU with Triton (in place, by :func:`_kernel_update_in_place`) instead
    of its CPU path, whose fp32 temporaries of every trained parameter a GPU never holds."""
    stack = ExitStack()
    stack.enter_context(unittest.mock.patch.object(ShardedAdamW8bit, "_on_kernel", staticmethod(lambda device: True)))
    stack.enter_context(unittest.mock.patch.object(fused_kernel, "adamw_step", _kernel_update_in_place))
    return stack


def measure_step(trainer: Trainer, micro_batches: list) -> StepMeasurement:
    """Two :meth:`Trainer.step` calls under torch's memory tracker — the first creates the optimizer state, so
    the peak is that of every later step —; FLOPs and collectives of the second."""
    tracker = MemoryTracker()
    tracker.track_external(trainer.model, trainer.optimizer,
                           *(t for batch in micro_batches for t in (batch.target, batch.weights)))
    observer = UnitObserver(trainer.base)
    gradients = {}

    def record_gradients(optimizer, args, kwargs):
        gradients["bytes"] = local_bytes(p.grad for p in trainer.params if p.grad is not None)

    hook = trainer.optimizer.register_step_pre_hook(record_gradients)
    flops = FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS)
    collectives = CollectiveCounter()
    trainer.lag_reads = True  # leave each step's values unread, to be discarded: fake tensors hold none
    try:
        with tracker:
            trainer.step(micro_batches, read=False)
            trainer.discard_unread()  # the step's loss and grad-norm: fake tensors have no values to read
            tracker.reset_mod_stats()  # per-module statistics only; the peak is kept
            with flops, collectives:
                trainer.step(micro_batches, read=False)
            trainer.discard_unread()
    finally:
        hook.remove()
    (peak,) = tracker.get_tracker_snapshot("peak").values()
    return StepMeasurement(
        parameter_bytes=local_bytes(trainer.model.parameters()), gradient_bytes=gradients["bytes"],
        optimizer_bytes=optimizer_state_bytes(trainer.optimizer), peak_bytes=peak["Total"],
        peak_breakdown={str(getattr(k, "value", k)): v for k, v in peak.items() if k != "Total"},
        flops=flops.get_total_flops(), units=observer.result(), traced=collectives)


@dataclass(frozen=True)
class Workload:
    """The biggest micro-batch the configuration trains on: square images, text padded to its budget."""

    side: int
    batch: int
    text_tokens: int
    micro_batches: int

    @property
    def image_tokens(self) -> int:
        return (self.side // PATCH_SIZE) ** 2


def workload(cfg: Config) -> Workload:
    """Of every resolution stage, the one with the most image tokens per micro-batch; the square with its
    largest bucket's area (rounded down to whole patches) stands for that bucket. A packed stage
    (``max_tokens``) is planned as a padded batch of as many such images as its row holds."""
    text = cfg.data.max_text_tokens

    def largest(stage) -> tuple[int, int]:
        side = math.isqrt(max(w * h for w, h in stage.buckets)) // PATCH_SIZE * PATCH_SIZE
        per_image = (side // PATCH_SIZE) ** 2 + text
        batch = max(1, stage.max_tokens // per_image) if stage.max_tokens else stage.batch_size
        return side, batch

    side, batch = max((largest(stage) for stage in resolve_stages(cfg.data, cfg.train.batch_size)),
                      key=lambda sb: sb[0] ** 2 * sb[1])
    return Workload(side, batch, text, cfg.train.grad_accum)


@dataclass
class Plan:
    cfg: Config
    gpus: int
    per_node: int
    gpu: GPU
    load: Workload
    step: StepMeasurement
    comm: Communication

    @property
    def fits(self) -> bool:
        return self.step.peak_bytes <= self.gpu.memory_bytes

    def hbm_bytes(self) -> int:
        """A loose lower bound on the bytes one step moves through GPU memory: every gathered weight read in
        each forward and each backward, the optimizer reading parameters, gradients and state and writing
        parameters and state, every saved activation written once and read once."""
        param_itemsize = TORCH_DTYPES[self.cfg.parallel.param_dtype].itemsize
        weights = sum(u.gathered_bytes(1, param_itemsize) * (1 + u.in_backward) for u in self.step.units
                      if u.in_forward) * self.load.micro_batches
        trained = self.step.gradient_bytes
        optimizer = 3 * trained + 2 * self.step.optimizer_bytes
        activations = 2 * self.step.peak_breakdown.get("Activation", 0)
        return weights + optimizer + activations

    def bounds(self) -> dict[str, float]:
        """Seconds per step each resource needs at its datasheet peak; the step takes at least the largest."""
        return {"compute": self.step.flops / (self.gpu.bf16_tflops * 1e12),
                "memory": self.hbm_bytes() / (self.gpu.hbm_gb_s * 1e9),
                "communication": self.comm.seconds(self.gpu)}


def init_fake_process_group(world: int) -> None:
    """A process group of ``world`` ranks of which this process is rank 0; collectives return at once, so
    FSDP shards, gathers and reduces with the real sizes and no peers."""
    import torch.testing._internal.distributed.fake_pg  # noqa: F401  registers the "fake" backend
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


def fake_trainer(cfg: Config, env: DistEnv, mode: FakeTensorMode) -> Trainer:
    """The production trainer with its model materialised as fake tensors of ``mode``, without weights.

    :func:`hidream_ft.model.loading.load_model` materialises the sharded meta model between its ``prepare``
    and ``fill`` hooks: the mode is active exactly there. Building the meta model, the device mesh and the
    sharding (which read rank lists from tensors) run outside it."""

    def load(*args, prepare, **kwargs):
        with ExitStack() as fake:
            def prepare_then_enter(model):
                prepared = prepare(model)
                fake.enter_context(mode)
                return prepared

            return load_model(*args, prepare=prepare_then_enter, fill=lambda model: fake.close(), **kwargs)

    return Trainer(cfg, env, load=load)


def make_plan(cfg: Config, gpus: int, per_node: int, gpu: GPU) -> Plan:
    """Build the configured run for ``gpus`` ranks on fake tensors and measure one step of rank 0."""
    load = workload(cfg)
    env = DistEnv(rank=0, world_size=gpus, local_rank=0, local_world_size=min(gpus, per_node),
                  device=torch.device("cpu"))
    init_fake_process_group(gpus)
    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        trainer = fake_trainer(cfg, env, mode)
        # Real inputs (small) built outside the mode: the layout code reads their values.
        micro_batches = [synthetic_batch(trainer, load.side, load.batch, load.text_tokens)
                         for _ in range(load.micro_batches)]
        # The ViT derives its packing from the image-grid tensor with data-dependent ops (repeat_interleave,
        # tolist); fake tensors that small keep their real values ("constants"), so those ops can run.
        with mode, unittest.mock.patch.object(fake_tensor, "CONSTANT_NUMEL_LIMIT", CONSTANT_NUMEL_LIMIT), \
                gpu_optimizer_kernel():
            step = measure_step(trainer, micro_batches)
    finally:
        dist.destroy_process_group()
    parallel = cfg.parallel
    comm = communication(step.units, gpus, per_node, parallel.hsdp, load.micro_batches,
                         TORCH_DTYPES[parallel.param_dtype].itemsize, TORCH_DTYPES[parallel.reduce_dtype].itemsize)
    return Plan(cfg, gpus, per_node, gpu, load, step, comm)


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.2f} MiB"


def report(plan: Plan) -> str:
    cfg, load, step, comm, gpu = plan.cfg, plan.load, plan.step, plan.comm, plan.gpu
    layout = ("unsharded" if plan.gpus == 1 else
              "HSDP" if cfg.parallel.hsdp and plan.gpus > plan.per_node else "FSDP")
    bounds = plan.bounds()
    limit = max(bounds, key=bounds.get)
    lines = [
        f"plan: {cfg.train.mode} fine-tune, {load.side}×{load.side} × batch {load.batch} (+{load.text_tokens} "
        f"text tokens), {load.micro_batches} micro-batch(es) per step, AC {cfg.parallel.activation_checkpointing}, "
        f"{cfg.optim.name}; {plan.gpus} × {gpu.name} ({min(plan.gpus, plan.per_node)} per node, {layout})",
        "per rank (rank 0, which holds the largest shards):",
        f"  parameters        {gib(step.parameter_bytes)}",
        f"  gradients         {gib(step.gradient_bytes)}",
        f"  optimizer state   {gib(step.optimizer_bytes)}",
        "  at the peak       " + ", ".join(f"{k.lower()} {gib(v)}" for k, v in step.peak_breakdown.items() if v),
        f"  predicted peak    {gib(step.peak_bytes)} of {gib(gpu.memory_bytes)} ({gpu.memory_gb:g} GB datasheet)",
        f"compute: {step.flops / 1e12:.2f} TFLOP per step per rank",
        f"communication per step per rank: all-gather {gib(comm.all_gather_bytes)}, reduce-scatter "
        f"{gib(comm.reduce_scatter_bytes)}, all-reduce {gib(comm.all_reduce_bytes)}; received "
        f"{gib(comm.intra_node_received)} within the node, {gib(comm.inter_node_received)} over the network",
        f"step time ≥ {bounds[limit]:.3f} s ({limit}-bound; compute {bounds['compute']:.3f} s, memory "
        f"{bounds['memory']:.3f} s, communication {bounds['communication']:.3f} s at datasheet peaks)",
        f"{'FITS' if plan.fits else 'DOES NOT FIT'}: predicted peak {gib(step.peak_bytes)} "
        f"{'≤' if plan.fits else '>'} {gib(gpu.memory_bytes)} on the {gpu.name}",
    ]
    return "\n".join(lines)


SCALING_WORLDS = (8, 64, 512)


def scaling_table(plan: Plan, worlds=SCALING_WORLDS) -> str:
    """Communication per rank per step at other world sizes, FSDP and HSDP, from this plan's units (a plan on
    more than one rank, so that its model is sharded), and the scaling efficiency that follows at this plan's
    compute time per rank: the step is compute / (compute + communication) without overlap, compute /
    max(compute, communication) with perfect overlap."""
    parallel, gpu = plan.cfg.parallel, plan.gpu
    compute = plan.bounds()["compute"]
    rows = ["| GPUs | layout | all-gather GiB | reduce-scatter GiB | all-reduce GiB | in-node GiB | network GiB "
            "| comm s | efficiency (no overlap / overlap) |", "|---|---|---|---|---|---|---|---|---|"]
    for world in worlds:
        for hsdp in (False, True):
            comm = communication(plan.step.units, world, plan.per_node, hsdp, plan.load.micro_batches,
                                 TORCH_DTYPES[parallel.param_dtype].itemsize,
                                 TORCH_DTYPES[parallel.reduce_dtype].itemsize)
            seconds = comm.seconds(gpu)
            rows.append(f"| {world} | {'HSDP' if hsdp else 'FSDP'} | {comm.all_gather_bytes / GIB:.2f} | "
                        f"{comm.reduce_scatter_bytes / GIB:.2f} | {comm.all_reduce_bytes / GIB:.3f} | "
                        f"{comm.intra_node_received / GIB:.2f} | {comm.inter_node_received / GIB:.2f} | "
                        f"{seconds:.3f} | {compute / (compute + seconds):.0%} / {compute / max(compute, seconds):.0%} |")
    return "\n".join(rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hidream_ft.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the training TOML file (docs/config.md)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.batch_size=4 (repeatable)")
    parser.add_argument("--gpus", type=int_at_least(1), default=1, help="ranks the run will use")
    parser.add_argument("--gpus-per-node", type=int_at_least(1), default=8, help="for HSDP and the links")
    parser.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)} (datasheet table in "
                                                     "docs/planning.md)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b", help="model shape (tiny: tests)")
    parser.add_argument("--scaling", action="store_true",
                        help=f"also print the communication at {', '.join(map(str, SCALING_WORLDS))} GPUs, FSDP and "
                             "HSDP (needs --gpus > 1)")
    return parser.parse_args(argv)


def planning_overrides(shape_dir: Path, output_dir: Path) -> list[str]:
    """The shape's config instead of the model's files (no weights are read), and eager layers: compiled
    kernels fuse away intermediates the planner counts, so it plans on the safe side."""
    return [f"model.path={toml_literal(str(shape_dir))}", 'model.weights=""', "parallel.compile=false",
            f"logging.output_dir={toml_literal(str(output_dir))}", "logging.tensorboard=false"]


@entry_point
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.gpu not in GPUS:
        raise UserError(f"--gpu {args.gpu!r}: expected one of {', '.join(GPUS)}")
    if args.scaling and args.gpus == 1:
        raise UserError("--scaling needs --gpus > 1: on one rank the model is not sharded (no FSDP units)")
    with tempfile.TemporaryDirectory(prefix="hidream-plan-") as tmp:
        shape_dir = write_shape_dir(Path(tmp), args.shape)
        cfg = load_config(args.config, [*args.set, *planning_overrides(shape_dir, Path(tmp) / "run")])
        plan = make_plan(cfg, args.gpus, args.gpus_per_node, GPUS[args.gpu])
    print(report(plan), flush=True)
    if args.scaling:
        print(scaling_table(plan), flush=True)
    return 0 if plan.fits else DOES_NOT_FIT_STATUS


if __name__ == "__main__":
    sys.exit(main())
