"""8-bit AdamW on FSDP2-sharded (DTensor) or plain parameters: bitsandbytes' blockwise kernel on each rank's
local shard, with reshardable fp32 checkpoints and optional stochastic rounding. Design, exactness and
measurements are in docs/optimizers.md."""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections import defaultdict

import torch
from torch.distributed.tensor import DTensor

# Importing bitsandbytes logs and warns about optional GPU kernels (e.g. "Failed to load CPU gemm_4bit_forward")
# that its blockwise optimizer kernel does not use: keep that out of the console.
_bnb_logger = logging.getLogger("bitsandbytes")
_bnb_level = _bnb_logger.level
_bnb_logger.setLevel(logging.ERROR)
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as bnb_functional
except ImportError as e:  # the GPU image does not ship it
    raise ImportError("optim.name = 'adamw8bit' needs bitsandbytes ≥ 0.50 (pip install bitsandbytes)") from e
finally:
    _bnb_logger.setLevel(_bnb_level)

BLOCK_SIZE = 256  # bitsandbytes' blockwise optimizer kernels quantise in blocks of 256 (CPU and CUDA)
# Where the true block scale can sit, in ulps, relative to the reconstructed one; tried in this order.
CANDIDATE_ULPS = (0, -1, 1, -2, 2)
MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (name, quantised with the signed map)


def quantization_map(signed: bool, device: torch.device) -> torch.Tensor:
    """bitsandbytes' dynamic map (256 sorted fp32 codes in [-0.993, 1] or [0, 1]): signed for m, unsigned for v."""
    return bnb_functional.create_dynamic_map(signed=signed).to(device)


def _blocks(flat: torch.Tensor) -> torch.Tensor:
    """[n] → [ceil(n/256), 256], zero-padded; zeros never raise a block's scale."""
    return torch.nn.functional.pad(flat, (0, -flat.numel() % BLOCK_SIZE)).view(-1, BLOCK_SIZE)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """fp32 values ``qmap[code] · absmax[block]``, shaped like ``codes`` (the kernel's own dequantisation)."""
    values = _blocks(qmap[codes.reshape(-1).long()]) * absmax[:, None]
    return values.reshape(-1)[: codes.numel()].view(codes.shape)


def _nearest_codes(scaled: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    upper = torch.bucketize(scaled, qmap).clamp(1, qmap.numel() - 1)
    lower = upper - 1
    take_lower = (scaled - qmap[lower]).abs() <= (qmap[upper] - scaled).abs()
    return torch.where(take_lower, lower, upper)


def quantize_blockwise(values: torch.Tensor, qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 values → (uint8 codes shaped like ``values``, fp32 scale per block of 256), nearest code.

    The kernel scales each block by its largest magnitude, which then quantises to the map's end: +1 exactly,
    or −0.993 for a negative maximum (the signed map has no −1). The scale is rebuilt the same way — the largest
    positive value, or the most negative one divided by 0.993 — and, because that division can miss the original
    fp32 scale by an ulp or two, the neighbouring scales are tried and the first one that reproduces every value
    of the block exactly is kept. So dequantised kernel state requantises to bit-identical values when the blocks
    are the same; for other blocks (another sharding) this is an ordinary nearest-code quantisation.
    """
    blocks = _blocks(values.reshape(-1).float())
    negative_end = -float(qmap[0]) if float(qmap[0]) < 0 else 1.0
    base = torch.where(blocks >= 0, blocks, -blocks / negative_end).amax(dim=1)

    def attempt(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = _nearest_codes(blocks / torch.where(scale > 0, scale, 1.0)[:, None], qmap)
        return codes, (qmap[codes] * scale[:, None] == blocks).all(dim=1)

    codes, settled = attempt(base)
    scale = base
    for ulps in CANDIDATE_ULPS[1:]:
        if bool(settled.all()):
            break
        candidate = _shift_ulps(base, ulps)
        candidate_codes, exact = attempt(candidate)
        better = exact & ~settled
        codes = torch.where(better[:, None], candidate_codes, codes)
        scale = torch.where(better, candidate, scale)
        settled |= better
    return codes.reshape(-1)[: values.numel()].to(torch.uint8).view(values.shape), scale.contiguous()


def _shift_ulps(x: torch.Tensor, ulps: int) -> torch.Tensor:
    """``x`` moved by ``ulps`` representable fp32 steps (x ≥ 0, so the bit pattern orders like the value)."""
    if ulps == 0:
        return x
    shifted = (x.view(torch.int32) + ulps).view(torch.float32)
    return torch.where(x > 0, shifted, x)


def stochastic_round_to_bf16(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 → bf16, rounding the magnitude up with probability (dropped low 16 bits) / 2¹⁶: unbiased.

    Adding uniform 16-bit noise to the fp32 bit pattern and truncating carries into the kept bits exactly
    with that probability; the sign bit is separate, so negative values round symmetrically.
    """
    noise = torch.randint(0, 1 << 16, values.shape, dtype=torch.int32, device=values.device, generator=generator)
    bits = values.contiguous().view(torch.int32) + noise
    return bits.bitwise_and_(-(1 << 16)).view(torch.float32).to(torch.bfloat16)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _shard_coordinates(param: torch.Tensor) -> tuple[int, ...]:
    """This rank's position along the sharded mesh dimensions: replicas of one shard (HSDP) share it."""
    if not isinstance(param, DTensor):
        return ()
    coordinate = param.device_mesh.get_coordinate()
    return tuple(coordinate[dim] for dim, placement in enumerate(param.placements) if placement.is_shard())


def _like_param(param: torch.Tensor, local_values: torch.Tensor) -> torch.Tensor:
    """A host-memory copy of per-shard values, wrapped like ``param`` (DTensor with its mesh and placements)."""
    if isinstance(param, DTensor):
        wrapped = DTensor.from_local(local_values, param.device_mesh, param.placements, run_check=False,
                                     shape=param.shape, stride=param.stride())
        # from_local keeps the device of the mesh; the host copy is made on the DTensor so the spec stays.
        return wrapped.to("cpu", copy=True)
    return local_values.to("cpu", copy=True)


class ShardedAdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with blockwise 8-bit moments, stepping each rank's local shard.

    Works on FSDP2 DTensor parameters and on plain tensors; gradients are read from ``p.grad`` (DTensor or
    not), so ``clip_grad_norm_`` before ``step`` and ``zero_grad`` after it work as with any optimizer.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        stochastic_rounding: bool = False,
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
        self._maps: dict[tuple[bool, torch.device], torch.Tensor] = {}

    def _map(self, signed: bool, device: torch.device) -> torch.Tensor:
        key = (signed, device)
        if key not in self._maps:
            self._maps[key] = quantization_map(signed, device)
        return self._maps[key]

    def _ordered_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def is_8bit(self, param: torch.Tensor) -> bool:
        """Matrices of at least ``min_8bit_size`` elements, judged on the global shape so all ranks and world
        sizes agree. Vectors (norms, biases) stay fp32: they cost nothing, and FSDP cuts them into pieces that
        are not whole 256-element blocks, which would make their requantisation after resharding inexact."""
        return param.dim() >= 2 and param.numel() >= self.min_8bit_size

    def _fresh_state(self, param: torch.Tensor) -> dict:
        local = _local(param)
        state = {"step": 0}
        for name, _ in MOMENTS:
            if self.is_8bit(param):
                state[f"{name}_codes"] = torch.zeros(local.shape, dtype=torch.uint8, device=local.device)
                state[f"{name}_absmax"] = torch.zeros(-(-local.numel() // BLOCK_SIZE), device=local.device)
            else:
                state[name] = torch.zeros(local.shape, dtype=torch.float32, device=local.device)
        return state

    def _rounding_generator(self, index: int, step: int, param: torch.Tensor, device: torch.device):
        """A generator keyed by (seed, step, parameter, shard): exact resume needs no saved RNG state."""
        key = repr((self.seed, step, index, _shard_coordinates(param))).encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        return torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                index += 1
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state.update(self._fresh_state(param))
                state["step"] += 1
                local = _local(param)
                if local.numel() == 0:  # an uneven FSDP split can leave a rank without rows
                    continue
                rounds = self.stochastic_rounding and local.dtype == torch.bfloat16
                # The kernel needs contiguous memory and one dtype for parameter and gradient; stochastic
                # rounding needs the fp32 result before it is rounded.
                work = local.contiguous().float() if rounds else local.contiguous()
                grad = _local(param.grad).contiguous().to(work.dtype)
                self._update(work, grad, state, group, beta1, beta2)
                if rounds:
                    generator = self._rounding_generator(index, state["step"], param, local.device)
                    local.copy_(stochastic_round_to_bf16(work, generator))
                elif work is not local:
                    local.copy_(work)
        return loss

    def _update(self, work, grad, state, group, beta1: float, beta2: float) -> None:
        common = dict(eps=group["eps"], step=state["step"], lr=float(group["lr"]), weight_decay=group["weight_decay"])
        if "exp_avg_codes" in state:
            bnb_functional.optimizer_update_8bit_blockwise(
                "adam", grad, work, state["exp_avg_codes"], state["exp_avg_sq_codes"], beta1, beta2, 0.0, 0.0,
                qmap1=self._map(True, work.device), qmap2=self._map(False, work.device),
                absmax1=state["exp_avg_absmax"], absmax2=state["exp_avg_sq_absmax"], **common,
            )
        else:
            bnb_functional.optimizer_update_32bit(
                "adam", grad, work, state["exp_avg"], beta1, state2=state["exp_avg_sq"], beta2=beta2, **common,
            )

    def moments(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(exp_avg, exp_avg_sq) of ``param``'s local shard as fp32, dequantised when stored in 8 bits."""
        state = self.state[param]
        if "exp_avg_codes" not in state:
            return state["exp_avg"], state["exp_avg_sq"]
        return tuple(
            dequantize_blockwise(state[f"{name}_codes"], state[f"{name}_absmax"],
                                 self._map(signed, state[f"{name}_codes"].device))
            for name, signed in MOMENTS
        )

    def state_dict(self) -> dict:
        """torch AdamW's layout: per parameter ``step`` and fp32 ``exp_avg``/``exp_avg_sq`` shaped like it."""
        packed = super().state_dict()
        params = self._ordered_params()
        exported = {}
        for index, state in packed["state"].items():
            param = params[index]
            exp_avg, exp_avg_sq = self.moments(param)
            exported[index] = {
                "step": torch.tensor(float(state["step"])),
                "exp_avg": _like_param(param, exp_avg),
                "exp_avg_sq": _like_param(param, exp_avg_sq),
            }
        packed["state"] = exported
        return packed

    def load_state_dict(self, state_dict: dict) -> None:
        """Accepts what :meth:`state_dict` (or torch AdamW) produced, resharded or not; requantises the moments.

        Parameters are matched by position in the param groups, as torch optimizers do; state keys may be
        indices or names (torch.distributed.checkpoint passes names).
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(saved["params"]) != len(group["params"]) for saved, group in zip(saved_groups, self.param_groups)
        ):
            raise ValueError(
                "optimizer state does not match the parameters: saved group sizes "
                f"{[len(g['params']) for g in saved_groups]}, now {[len(g['params']) for g in self.param_groups]}"
            )
        saved_ids = [pid for group in saved_groups for pid in group["params"]]
        self.state = defaultdict(dict)
        for saved_id, param in zip(saved_ids, self._ordered_params()):
            if saved_id in state_dict["state"]:
                self.state[param] = self._import_state(param, state_dict["state"][saved_id], saved_id)
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({key: value for key, value in saved.items() if key != "params"})

    def _import_state(self, param: torch.Tensor, saved: dict, name) -> dict:
        local = _local(param)
        state = {"step": int(saved["step"])}
        for key, signed in MOMENTS:
            values = _local(saved[key])
            if tuple(values.shape) != tuple(local.shape):
                raise ValueError(f"optimizer state {name}.{key}: shape {list(values.shape)} does not match the "
                                 f"parameter shard {list(local.shape)}")
            values = values.to(local.device, torch.float32)
            if self.is_8bit(param):
                codes, absmax = quantize_blockwise(values, self._map(signed, local.device))
                state[f"{key}_codes"], state[f"{key}_absmax"] = codes, absmax
            else:
                state[key] = values.clone()
        return state
