"""The CUDA kernel of the fused 8-bit AdamW step, in Triton: one launch per group of shards, one program per
256-element block, parameters found through tables of addresses. Its math is the CPU path's in
hidream_ft/optim/adamw8bit.py, op for op; importable without Triton or a GPU (``available()`` says False)."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the optimizer then uses its torch implementation
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:
    _TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

    @triton.jit
    def _hash32(x, M0: tl.constexpr, M1: tl.constexpr):
        x = x ^ (x >> 16)
        x = x * M0
        x = x ^ (x >> 15)
        x = x * M1
        return x ^ (x >> 16)

    @triton.jit
    def _nearest_code(x, qmap):
        """bucketize (first entry ≥ x) by binary search over the 256 sorted codes, then the nearer neighbour."""
        lo = tl.zeros(x.shape, tl.int32)
        hi = tl.full(x.shape, 256, tl.int32)
        for _ in tl.static_range(9):
            active = lo < hi
            mid = tl.minimum((lo + hi) // 2, 255)
            less = tl.load(qmap + mid) < x
            lo, hi = tl.where(active & less, mid + 1, lo), tl.where(active & ~less, mid, hi)
        upper = tl.minimum(tl.maximum(lo, 1), 255)
        lower = upper - 1
        take_lower = tl.abs(x - tl.load(qmap + lower)) <= tl.abs(tl.load(qmap + upper) - x)
        return tl.where(take_lower, lower, upper)

    @triton.jit
    def _adamw_kernel(
        table, n_params, qmap1, qmap2, step_size_ptr, bias2_sqrt_ptr, found_inf_ptr, key_ptr,
        one_minus_beta1, one_minus_beta2, beta1, beta2, eps, decay,
        PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, EIGHT_BIT: tl.constexpr, ROUNDS: tl.constexpr,
        HAS_FOUND_INF: tl.constexpr, SEARCH_STEPS: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        block = tl.program_id(0).to(tl.int64)
        # The parameter whose blocks hold this one: the last i with first_block[i] ≤ block.
        lo = 0
        hi = n_params - 1
        for _ in tl.static_range(SEARCH_STEPS):
            active = lo < hi
            mid = (lo + hi + 1) // 2
            ahead = tl.load(table + 6 * n_params + mid) <= block
            lo, hi = tl.where(active & ahead, mid, lo), tl.where(active & ~ahead, mid - 1, hi)
        i = lo
        local_block = block - tl.load(table + 6 * n_params + i)
        cols = tl.load(table + 7 * n_params + i)
        blocks_per_row = (cols + BLOCK_SIZE - 1) // BLOCK_SIZE
        row = local_block // blocks_per_row
        col = (local_block % blocks_per_row) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        inside = col < cols
        element = row * cols + col
        keep = inside
        if HAS_FOUND_INF:
            keep = keep & (tl.load(found_inf_ptr + col * 0) == 0)  # broadcast as a vector load
        param = tl.load(table + i).to(tl.pointer_type(PARAM_DTYPE))
        grad = tl.load(table + n_params + i).to(tl.pointer_type(GRAD_DTYPE))
        g = tl.load(grad + element, mask=inside, other=0.0).to(tl.float32)
        p = tl.load(param + element, mask=inside, other=0.0).to(tl.float32)
        if EIGHT_BIT:
            codes1 = tl.load(table + 2 * n_params + i).to(tl.pointer_type(tl.uint8))
            scales1 = tl.load(table + 3 * n_params + i).to(tl.pointer_type(tl.float32))
            codes2 = tl.load(table + 4 * n_params + i).to(tl.pointer_type(tl.uint8))
            scales2 = tl.load(table + 5 * n_params + i).to(tl.pointer_type(tl.float32))
            c1 = tl.load(codes1 + element, mask=inside, other=0).to(tl.int32)
            c2 = tl.load(codes2 + element, mask=inside, other=0).to(tl.int32)
            m = tl.where(inside, tl.load(qmap1 + c1) * tl.load(scales1 + local_block), 0.0)
            v = tl.where(inside, tl.load(qmap2 + c2) * tl.load(scales2 + local_block), 0.0)
        else:
            state1 = tl.load(table + 2 * n_params + i).to(tl.pointer_type(tl.float32))
            state2 = tl.load(table + 4 * n_params + i).to(tl.pointer_type(tl.float32))
            m = tl.load(state1 + element, mask=inside, other=0.0)
            v = tl.load(state2 + element, mask=inside, other=0.0)
        m = m * beta1 + g * one_minus_beta1
        v = v * beta2 + (g * g) * one_minus_beta2
        p = p * decay
        denom = tl.div_rn(tl.sqrt_rn(v), tl.load(bias2_sqrt_ptr)) + eps
        p = p - tl.load(step_size_ptr) * tl.div_rn(m, denom)
        if ROUNDS:
            key = tl.load(key_ptr).to(tl.uint32)
            index = tl.load(table + 8 * n_params + i).to(tl.uint32)
            global_element = (tl.load(table + 9 * n_params + i) + element).to(tl.uint32)
            noise = _hash32(_hash32(key ^ index, M0, M1) ^ global_element, M0, M1) & 0xFFFF
            bits = (p.to(tl.int32, bitcast=True) + noise.to(tl.int32)) & -65536
            new_p = bits.to(tl.float32, bitcast=True).to(PARAM_DTYPE)
        else:
            new_p = p.to(PARAM_DTYPE)
        tl.store(param + element, new_p, mask=keep)
        if EIGHT_BIT:
            absmax1 = tl.max(tl.abs(m), axis=0)
            absmax2 = tl.max(tl.abs(v), axis=0)
            n1 = tl.div_rn(m, tl.where(absmax1 > 0, absmax1, 1.0))
            n2 = tl.div_rn(v, tl.where(absmax2 > 0, absmax2, 1.0))
            tl.store(codes1 + element, _nearest_code(n1, qmap1).to(tl.uint8), mask=keep)
            tl.store(codes2 + element, _nearest_code(n2, qmap2).to(tl.uint8), mask=keep)
            write_scales = block >= 0
            if HAS_FOUND_INF:
                write_scales = tl.load(found_inf_ptr) == 0
            tl.store(scales1 + local_block, absmax1, mask=write_scales)
            tl.store(scales2 + local_block, absmax2, mask=write_scales)
        else:
            tl.store(state1 + element, m, mask=keep)
            tl.store(state2 + element, v, mask=keep)


def adamw_step(plan, grads, states, step_size, bias2_sqrt, found_inf, key, qmap1, qmap2, multipliers, block_size,
               *, lr, beta1, beta2, eps, weight_decay) -> None:
    """Launch the kernel for one plan of :class:`hidream_ft.optim.adamw8bit.ShardedAdamW8bit`: the 0-dim device
    tensors ``step_size``, ``bias2_sqrt``, ``found_inf`` (or None) and ``key`` (None: round to nearest) are read
    by the kernel, never by the host."""
    names = (("exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales") if plan.eight_bit
             else ("exp_avg", None, "exp_avg_sq", None))
    grads = [grad.contiguous() for grad in grads]
    columns = []
    first_block = 0
    for local, grad, state, (_, cols), blocks, index, offset in zip(
        plan.flat_locals, grads, states, plan.shapes, plan.block_counts, plan.indices, plan.global_offsets
    ):
        pointers = [state[name].data_ptr() if name else 0 for name in names]
        columns.append([local.data_ptr(), grad.data_ptr(), *pointers, first_block, cols, index, offset])
        first_block += blocks
    device = plan.flat_locals[0].device
    table = torch.tensor(columns, dtype=torch.int64).t().contiguous().to(device, non_blocking=True)
    n_params = len(columns)
    unused = torch.zeros((), dtype=torch.float32, device=device)
    _adamw_kernel[(first_block,)](
        table, n_params, qmap1, qmap2, step_size, bias2_sqrt,
        found_inf if found_inf is not None else unused, key if key is not None else unused,
        1 - beta1, 1 - beta2, beta1, beta2, eps, 1 - lr * weight_decay,
        PARAM_DTYPE=_TRITON_DTYPES[plan.params[0].dtype], GRAD_DTYPE=_TRITON_DTYPES[grads[0].dtype],
        EIGHT_BIT=plan.eight_bit, ROUNDS=key is not None, HAS_FOUND_INF=found_inf is not None,
        SEARCH_STEPS=max(1, n_params.bit_length()), M0=multipliers[0], M1=multipliers[1], BLOCK_SIZE=block_size,
    )
