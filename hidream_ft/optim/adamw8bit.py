"""Fused 8-bit AdamW on FSDP2-sharded (DTensor) or plain parameters: one update over all local shards of a
dtype, moments as uint8 codes plus one scale per 256-element block along each parameter's last dimension,
bf16 weights with counter-based stochastic rounding. Format, design and tests: docs/optimizers.md."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

import hidream_ft.optim.fused_kernel as fused_kernel

BLOCK_SIZE = 256
MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (name, quantised with the signed map)
_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2³¹: their product with a 32-bit value fits int64, so the CPU hash needs no overflow.
HASH_MULTIPLIERS = (0x7FEB352D, 0x2C1B3C6D)


def quantization_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The dynamic map of bitsandbytes' 8-bit optimizers: 256 sorted fp32 codes, in [-0.993, 1] (signed, for
    m) or [0, 1] (unsigned, for v). Code values are decade × mean of evenly spaced fractions in [0.1, 1], for
    the decades 10⁻⁶ … 1, plus 0 and 1; bit-identical to ``bitsandbytes.functional.create_dynamic_map``."""
    values = [torch.tensor([0.0, 1.0])]
    for exponent in range(7):
        edges = torch.linspace(0.1, 1, (2**exponent if signed else 2 ** (exponent + 1)) + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values.append(10 ** (exponent - 6) * means)
        if signed:
            values.append(-(10 ** (exponent - 6)) * means)
    return torch.cat(values).sort().values.to(device)


# The code whose value is 0, by signedness (127 in the signed map, 0 in the unsigned one).
ZERO_CODES = {signed: int(quantization_map(signed).abs().argmin()) for signed in (True, False)}


def _nearest_codes(normalized: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """Index of the nearest map entry (ties to the lower one), as the Triton kernel's binary search finds it."""
    upper = torch.bucketize(normalized, qmap).clamp_(1, qmap.numel() - 1)
    lower = upper - 1
    take_lower = (normalized - qmap[lower]).abs() <= (qmap[upper] - normalized).abs()
    return torch.where(take_lower, lower, upper)


def quantize_blocks(blocks: torch.Tensor, qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [B, 256] → (uint8 codes [B, 256], fp32 scale per block = its largest magnitude), nearest code."""
    scales = blocks.abs().amax(dim=1)
    normalized = blocks / torch.where(scales > 0, scales, 1.0)[:, None]
    return _nearest_codes(normalized, qmap).to(torch.uint8), scales


def dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    return qmap[codes.long()] * scales[:, None]


def _row_blocks(values: torch.Tensor) -> torch.Tensor:
    """A parameter-shaped tensor as [rows · blocks per row, 256]: each row zero-padded to whole blocks."""
    rows = values.reshape(values.shape[0], -1)
    return torch.nn.functional.pad(rows, (0, -rows.shape[1] % BLOCK_SIZE)).view(-1, BLOCK_SIZE)


def quantize_blockwise(values: torch.Tensor, qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix (or higher-dim tensor, rows = dim 0) → (uint8 codes shaped like it, fp32 scales [rows, blocks])."""
    rows, cols = _rows_cols(values)
    codes, scales = quantize_blocks(_row_blocks(values.float()), qmap)
    codes = codes.view(rows, -1)[:, :cols].reshape(values.shape)
    return codes, scales.view(rows, -1)


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """fp32 values shaped like ``codes``: ``qmap[code] · scale[row, block]``."""
    rows, cols = _rows_cols(codes)
    values = dequantize_blocks(_row_blocks(codes), scales.reshape(-1), qmap)
    return values.view(rows, -1)[:, :cols].reshape(codes.shape)


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors holding values in [0, 2³²); the Triton kernel's, on uint32."""
    x = x ^ (x >> 16)
    x = (x * HASH_MULTIPLIERS[0]) & _MASK32
    x = x ^ (x >> 15)
    x = (x * HASH_MULTIPLIERS[1]) & _MASK32
    return x ^ (x >> 16)


def rounding_key(seed: int, step: torch.Tensor) -> torch.Tensor:
    """The per-step key of the rounding noise, from the seed and the device step counter (no host sync)."""
    return hash32((seed & _MASK32) ^ hash32(step.long() & _MASK32))


def rounding_noise(key: torch.Tensor, param_ids: torch.Tensor, element_ids: torch.Tensor) -> torch.Tensor:
    """16 uniform bits per element, a pure function of (key, parameter index, global element index)."""
    return hash32(hash32(key ^ param_ids) ^ (element_ids & _MASK32)) & 0xFFFF


def stochastic_round_to_bf16(values: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """fp32 → bf16, rounding the magnitude up with probability (dropped low 16 bits) / 2¹⁶: unbiased.

    Adding 16 uniform noise bits to the fp32 bit pattern and truncating carries into the kept bits exactly
    with that probability; the sign bit is separate, so negative values round symmetrically.
    """
    bits = values.view(torch.int32) + noise.to(torch.int32)
    return bits.bitwise_and_(-(1 << 16)).view(torch.float32).to(torch.bfloat16)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _rows_cols(param: torch.Tensor) -> tuple[int, int]:
    return param.shape[0], math.prod(param.shape[1:])


def _global_element_offset(param: torch.Tensor) -> int:
    """Where this rank's shard starts in the flattened full parameter (FSDP2 shards whole rows). Computed from
    the mesh coordinate and placements in Python ints: no tensor value is read (the planner's fake tensors have
    none)."""
    if not isinstance(param, DTensor) or not param.dim():
        return 0
    rows, first_row = param.shape[0], 0
    for placement, size, rank in zip(param.placements, param.device_mesh.shape, param.device_mesh.get_coordinate()):
        if isinstance(placement, Shard):  # FSDP2 shards dim 0
            rows, offset = Shard.local_shard_size_and_offset(rows, size, rank)
            first_row += offset
    return first_row * math.prod(param.shape[1:])


def _like_param(param: torch.Tensor, local: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``local`` (a per-shard tensor of global ``shape``) wrapped like ``param``: a DTensor with its mesh and
    placements, sharing memory; a plain parameter's state is returned as it is."""
    if not isinstance(param, DTensor):
        return local
    if not all(p == Shard(0) or isinstance(p, Replicate) for p in param.placements):
        raise ValueError(f"adamw8bit supports parameters sharded on dim 0 only, got {param.placements}")
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=shape,
                              stride=stride)


@dataclass
class _Plan:
    """One fused update: the shards of one param group with one dtype, gradient dtype and state kind, as flat
    buffers. Views of the destinations are kept so that writing back is one op per buffer kind."""

    group: dict
    params: list[torch.Tensor]
    indices: list[int]                   # positions in the optimizer (they key the rounding noise)
    sizes: list[int]                     # local elements per parameter
    eight_bit: bool
    shapes: list[tuple[int, int]]        # (rows, cols) of each local shard
    block_counts: list[int]              # scale entries (rows · blocks per row) per parameter, 8-bit only
    local_ptrs: tuple[int, ...]          # the shards' addresses when the views were taken
    flat_locals: list[torch.Tensor]
    flat_states: dict[str, list[torch.Tensor]]
    pad_index: torch.Tensor | None       # flat element → padded block position; None when rows fill blocks or on the kernel
    param_ids: torch.Tensor | None       # per element, for the rounding noise (CPU path, bf16 only)
    element_ids: torch.Tensor | None
    global_offsets: list[int]


class ShardedAdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with blockwise 8-bit moments, one fused update per step over the local
    shards of all parameters.

    Works on FSDP2 DTensor parameters and on plain tensors; gradients are read from ``p.grad`` (DTensor or
    not), so ``clip_grad_norm_`` before ``step`` and ``zero_grad`` after it work as with any optimizer.
    ``found_inf``: a 0-dim float32 tensor on the parameters' device, or None; when it holds 1.0 the step
    leaves weights, moments and the step count as they were, decided on the device.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        stochastic_rounding: bool = True,
        min_8bit_size: int = 4096,
        seed: int = 0,
    ):
        if lr < 0:
            raise ValueError(f"learning rate must be ≥ 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(betas)}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"eps and weight_decay must be ≥ 0, got eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        # Construction-time settings, deliberately not in the param groups: a checkpoint must not override them.
        self.stochastic_rounding = stochastic_rounding
        self.min_8bit_size = min_8bit_size
        self.seed = seed
        self.found_inf: torch.Tensor | None = None
        self.step_count: torch.Tensor | None = None  # 0-dim float32 on the parameters' device
        self._maps: dict[tuple[bool, torch.device], torch.Tensor] = {}
        self._plans: dict[tuple[int, ...], list[_Plan]] = {}

    def _map(self, signed: bool, device: torch.device) -> torch.Tensor:
        key = (signed, device)
        if key not in self._maps:
            self._maps[key] = quantization_map(signed, device)
        return self._maps[key]

    def _ordered_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def is_8bit(self, param: torch.Tensor) -> bool:
        """Matrices of at least ``min_8bit_size`` elements, judged on the global shape so all ranks and world
        sizes agree. Vectors (norms, biases) keep fp32 moments: they cost nothing."""
        return param.dim() >= 2 and param.numel() >= self.min_8bit_size

    def _fresh_state(self, param: torch.Tensor) -> dict:
        local = _local(param)
        if not self.is_8bit(param):
            return {name: torch.zeros(local.shape, dtype=torch.float32, device=local.device) for name, _ in MOMENTS}
        rows, cols = _rows_cols(local)
        state = {}
        for name, _ in MOMENTS:
            state[f"{name}_codes"] = torch.zeros(local.shape, dtype=torch.uint8, device=local.device)
            state[f"{name}_scales"] = torch.zeros(rows, -(-cols // BLOCK_SIZE), device=local.device)
        return state

    def _state_keys(self, eight_bit: bool) -> list[str]:
        if eight_bit:
            return [f"{name}_{part}" for name, _ in MOMENTS for part in ("codes", "scales")]
        return [name for name, _ in MOMENTS]

    def _ensure_step_count(self, device: torch.device) -> torch.Tensor:
        if self.step_count is None:
            self.step_count = torch.zeros((), dtype=torch.float32, device=device)
        return self.step_count

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for p in self._ordered_params() if p.grad is not None]
        if params:  # none when the parameters were already updated in backward (attach_to_backward)
            self._advance(_local(params[0]).device)
            self._update(params)
        return loss

    def _advance(self, device: torch.device) -> None:
        """One more step for the bias corrections, unless ``found_inf`` says this one is skipped."""
        step = self._ensure_step_count(device)
        step.add_(1 if self.found_inf is None else 1 - self.found_inf)

    def _update(self, params: list[torch.Tensor]) -> None:
        """The AdamW update of ``params`` (each with a gradient) at the current step count."""
        positions = {id(p): i for i, p in enumerate(self._ordered_params())}
        indices = tuple(positions[id(p)] for p in params if _local(p).numel())
        for param in params:
            if not self.state[param]:
                self.state[param].update(self._fresh_state(param))
        for plan in self._plans_for(indices):
            self._run(plan, self.step_count)

    def attach_to_backward(self) -> None:
        """Optimizer in backward: each parameter is updated by a post-accumulate-grad hook as soon as its
        gradient is complete (under FSDP2, after its reduce-scatter) and its gradient is freed at once. Call
        :meth:`begin_backward` before each backward; ``step()`` then finds no gradients and does nothing."""
        for param in self._ordered_params():
            param.register_post_accumulate_grad_hook(self._update_in_backward)

    @torch.no_grad()
    def begin_backward(self, loss: torch.Tensor) -> None:
        """Start a step whose updates run in backward: it is skipped (on the device) when the loss of any rank
        is not finite. A non-finite gradient under a finite loss is not caught: no whole-gradient check exists
        before the first update."""
        found_inf = (~torch.isfinite(loss.detach())).float()
        if dist.is_initialized():
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
        self.found_inf = found_inf
        self._advance(found_inf.device)

    @torch.no_grad()
    def _update_in_backward(self, param: torch.Tensor) -> None:
        self._update([param])
        param.grad = None

    def _plans_for(self, indices: tuple[int, ...]) -> list[_Plan]:
        params = self._ordered_params()
        plans = self._plans.get(indices)
        if plans is not None and all(
            plan.local_ptrs == tuple(_local(p).data_ptr() for p in plan.params) for plan in plans
        ):
            return plans
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        members: dict[tuple, list[int]] = defaultdict(list)
        for index in indices:
            param = params[index]
            key = (id(group_of[id(param)]), param.dtype, _local(param.grad).dtype, self.is_8bit(param))
            members[key].append(index)
        plans = [self._plan(group_of[id(params[group[0]])], [params[i] for i in group], group, key[3])
                 for key, group in members.items()]
        self._plans[indices] = plans
        return plans

    def _plan(self, group: dict, params: list[torch.Tensor], indices: list[int], eight_bit: bool) -> _Plan:
        locals_ = [_local(p) for p in params]
        if not all(t.is_contiguous() for t in locals_):
            raise ValueError("adamw8bit needs contiguous parameter shards")
        shapes = [_rows_cols(t) if eight_bit else (1, t.numel()) for t in locals_]
        block_counts = [rows * -(-cols // BLOCK_SIZE) for rows, cols in shapes]
        device = locals_[0].device
        pad_index = None
        # Only the torch path pads rows to whole blocks by an index; the kernel masks the partial blocks itself.
        if eight_bit and any(cols % BLOCK_SIZE for _, cols in shapes) and not self._on_kernel(device):
            starts = torch.tensor([0, *block_counts[:-1]]).cumsum(0).tolist()
            pad_index = torch.cat([
                (start * BLOCK_SIZE + torch.arange(rows)[:, None] * (count // rows * BLOCK_SIZE)
                 + torch.arange(cols)[None, :]).reshape(-1)
                for start, count, (rows, cols) in zip(starts, block_counts, shapes)
            ]).to(device)
        offsets = [_global_element_offset(p) for p in params]
        param_ids = element_ids = None
        # The CPU path draws rounding noise from per-element ids; the kernel derives them from its tables.
        if self._rounds(params[0]) and not self._on_kernel(device):
            sizes = torch.tensor([t.numel() for t in locals_])
            param_ids = torch.repeat_interleave(torch.tensor(indices), sizes).to(device)
            element_ids = torch.cat([offset + torch.arange(t.numel()) for offset, t in zip(offsets, locals_)]).to(device)
        states = [self.state[p] for p in params]
        return _Plan(
            group=group, params=params, indices=list(indices), sizes=[t.numel() for t in locals_],
            eight_bit=eight_bit, shapes=shapes, block_counts=block_counts,
            local_ptrs=tuple(t.data_ptr() for t in locals_), flat_locals=[t.view(-1) for t in locals_],
            flat_states={key: [s[key].view(-1) for s in states] for key in self._state_keys(eight_bit)},
            pad_index=pad_index, param_ids=param_ids, element_ids=element_ids, global_offsets=offsets,
        )

    def _rounds(self, param: torch.Tensor) -> bool:
        return self.stochastic_rounding and param.dtype == torch.bfloat16

    @staticmethod
    def _on_kernel(device: torch.device) -> bool:
        """Whether the Triton kernel runs the update (CUDA with Triton installed), else the torch ops."""
        return device.type == "cuda" and fused_kernel.available()

    def _run(self, plan: _Plan, step: torch.Tensor) -> None:
        group = plan.group
        beta1, beta2 = group["betas"]
        # Bias corrections from the device step count: no host sync, the same scalars for both paths.
        step_size = float(group["lr"]) / (1 - torch.pow(beta1, step))
        bias2_sqrt = torch.sqrt(1 - torch.pow(beta2, step))
        hyper = dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                     weight_decay=group["weight_decay"])
        grads = [_local(p.grad) for p in plan.params]
        key = rounding_key(self.seed, step) if self._rounds(plan.params[0]) else None
        device = step.device
        if self._on_kernel(device):
            fused_kernel.adamw_step(
                plan, grads, [self.state[p] for p in plan.params], step_size, bias2_sqrt, self.found_inf, key,
                self._map(True, device), self._map(False, device), HASH_MULTIPLIERS, BLOCK_SIZE, **hyper,
            )
            return
        self._run_torch(plan, grads, step_size, bias2_sqrt, key, hyper)

    def _run_torch(self, plan: _Plan, grads, step_size, bias2_sqrt, key, hyper) -> None:
        """The CPU implementation: plain torch ops over the concatenated shards; the op count per step does not
        depend on the number of parameters."""
        gathered = {name: torch._chunk_cat(views, 0, 1).view(-1) for name, views in plan.flat_states.items()}
        old = torch._chunk_cat(plan.flat_locals, 0, 1).view(-1)
        grad = torch._chunk_cat(grads, 0, 1).view(-1).float()
        weights = old.float()
        if plan.eight_bit:
            grad, weights = self._padded(plan, grad), self._padded(plan, weights)
            grad, weights = grad.view(-1, BLOCK_SIZE), weights.view(-1, BLOCK_SIZE)
            signed, unsigned = self._map(True, grad.device), self._map(False, grad.device)
            # Padding takes the code of 0, so that it never raises a block's scale.
            exp_avg = dequantize_blocks(
                self._padded(plan, gathered["exp_avg_codes"], ZERO_CODES[True]).view(-1, BLOCK_SIZE),
                gathered["exp_avg_scales"], signed)
            exp_avg_sq = dequantize_blocks(
                self._padded(plan, gathered["exp_avg_sq_codes"], ZERO_CODES[False]).view(-1, BLOCK_SIZE),
                gathered["exp_avg_sq_scales"], unsigned)
        else:
            exp_avg, exp_avg_sq = gathered["exp_avg"], gathered["exp_avg_sq"]
        exp_avg = exp_avg * hyper["beta1"] + grad * (1 - hyper["beta1"])
        exp_avg_sq = exp_avg_sq * hyper["beta2"] + (grad * grad) * (1 - hyper["beta2"])
        weights = weights * (1 - hyper["lr"] * hyper["weight_decay"])
        weights = weights - step_size * (exp_avg / (exp_avg_sq.sqrt() / bias2_sqrt + hyper["eps"]))
        if plan.eight_bit:
            codes1, scales1 = quantize_blocks(exp_avg, signed)
            codes2, scales2 = quantize_blocks(exp_avg_sq, unsigned)
            new = {"exp_avg_codes": self._unpadded(plan, codes1.view(-1)), "exp_avg_scales": scales1,
                   "exp_avg_sq_codes": self._unpadded(plan, codes2.view(-1)), "exp_avg_sq_scales": scales2}
            weights = self._unpadded(plan, weights.view(-1))
        else:
            new = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        if key is not None:
            weights = stochastic_round_to_bf16(weights, rounding_noise(key, plan.param_ids, plan.element_ids))
        else:
            weights = weights.to(old.dtype)
        if self.found_inf is not None:
            skip = self.found_inf > 0
            weights = torch.where(skip, old, weights)
            new = {name: torch.where(skip, gathered[name], values) for name, values in new.items()}
        torch.split_with_sizes_copy(weights, plan.sizes, out=plan.flat_locals)
        for name, values in new.items():
            sizes = plan.block_counts if name.endswith("_scales") else plan.sizes
            torch.split_with_sizes_copy(values.view(-1), sizes, out=plan.flat_states[name])

    @staticmethod
    def _padded(plan: _Plan, flat: torch.Tensor, fill: int = 0) -> torch.Tensor:
        if plan.pad_index is None:
            return flat
        padded = flat.new_full((sum(plan.block_counts) * BLOCK_SIZE,), fill)
        return padded.index_put_((plan.pad_index,), flat)

    @staticmethod
    def _unpadded(plan: _Plan, padded: torch.Tensor) -> torch.Tensor:
        return padded if plan.pad_index is None else padded[plan.pad_index]

    def moments(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(exp_avg, exp_avg_sq) of ``param``'s local shard as fp32, dequantised when stored in 8 bits."""
        state = self.state[param]
        if "exp_avg_codes" not in state:
            return state["exp_avg"], state["exp_avg_sq"]
        return tuple(
            dequantize_blockwise(state[f"{name}_codes"], state[f"{name}_scales"],
                                 self._map(signed, state[f"{name}_codes"].device))
            for name, signed in MOMENTS
        )

    def state_dict(self) -> dict:
        """Per parameter ``step`` and either ``exp_avg_codes``/``exp_avg_scales``/``exp_avg_sq_codes``/
        ``exp_avg_sq_scales`` (8-bit) or fp32 ``exp_avg``/``exp_avg_sq``, wrapped like the parameter (DTensors
        sharded like it under FSDP) and sharing the optimizer's memory: nothing is copied or dequantised."""
        packed = super().state_dict()
        params = self._ordered_params()
        step = self.step_count.detach().cpu() if self.step_count is not None else torch.tensor(0.0)
        exported = {}
        for index, state in packed["state"].items():
            param = params[index]
            entry = {"step": step.clone()}
            for key, value in state.items():
                shape = (param.shape[0], value.shape[1]) if key.endswith("_scales") else param.shape
                entry[key] = _like_param(param, value, tuple(shape))
            exported[index] = entry
        packed["state"] = exported
        return packed

    def load_state_dict(self, state_dict: dict) -> None:
        """Accepts what :meth:`state_dict` produced (resharded or not), and fp32 ``exp_avg``/``exp_avg_sq`` as
        written by earlier versions or torch AdamW, which are quantised here. Parameters are matched by
        position in the param groups, as torch optimizers do; state keys may be indices or names
        (torch.distributed.checkpoint passes names). Existing state tensors are overwritten in place, so a
        load through DCP needs no second copy of the state."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(saved["params"]) != len(group["params"]) for saved, group in zip(saved_groups, self.param_groups)
        ):
            raise ValueError(
                "optimizer state does not match the parameters: saved group sizes "
                f"{[len(g['params']) for g in saved_groups]}, now {[len(g['params']) for g in self.param_groups]}"
            )
        saved_ids = [pid for group in saved_groups for pid in group["params"]]
        old_state, self.state = self.state, defaultdict(dict)
        steps = []
        for saved_id, param in zip(saved_ids, self._ordered_params()):
            if saved_id in state_dict["state"]:
                saved = state_dict["state"][saved_id]
                steps.append(float(saved["step"]))
                self.state[param] = self._import_state(param, saved, saved_id, old_state.get(param, {}))
        if steps:
            self._ensure_step_count(_local(self._ordered_params()[0]).device).fill_(max(steps))
        self._plans.clear()
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({key: value for key, value in saved.items() if key != "params"})

    def _import_state(self, param: torch.Tensor, saved: dict, name, current: dict) -> dict:
        local = _local(param)
        fresh = self._fresh_state(param)
        for key, signed in MOMENTS:
            qmap = self._map(signed, local.device)
            if f"{key}_codes" in saved:
                codes, scales = (_local(saved[f"{key}_{part}"]).to(local.device) for part in ("codes", "scales"))
                self._check_shape(name, f"{key}_codes", codes, local.shape)
                values = {f"{key}_codes": codes, f"{key}_scales": scales}
                if not self.is_8bit(param):
                    values = {key: dequantize_blockwise(codes, scales, qmap)}
            else:
                values = _local(saved[key]).to(local.device, torch.float32)
                self._check_shape(name, key, values, local.shape)
                values = dict(zip((f"{key}_codes", f"{key}_scales"), quantize_blockwise(values, qmap))) \
                    if self.is_8bit(param) else {key: values}
            for state_key, value in values.items():
                self._check_shape(name, state_key, value, fresh[state_key].shape)
                target = current.get(state_key)
                if target is None or target.shape != value.shape:
                    target = fresh[state_key]
                fresh[state_key] = target.copy_(value)
        return fresh

    @staticmethod
    def _check_shape(name, key: str, value: torch.Tensor, expected) -> None:
        if tuple(value.shape) != tuple(expected):
            raise ValueError(f"optimizer state {name}.{key}: shape {list(value.shape)} does not match the "
                             f"parameter shard's {list(expected)}")
