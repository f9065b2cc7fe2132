"""Dtype names: the one table from the names used in configs, flags and file headers to torch dtypes."""

from __future__ import annotations

import torch

# Long names (as in configs and config.json's torch_dtype) first, then the short command-line aliases.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
}
# The dtype codes of safetensors file headers.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str:
    """The long name of a floating dtype of :data:`TORCH_DTYPES`, e.g. ``"bfloat16"``."""
    return next(name for name, known in TORCH_DTYPES.items() if known == dtype)


def safetensors_code(dtype: torch.dtype) -> str:
    """The safetensors header code of ``dtype``, e.g. ``"BF16"``."""
    return next(code for code, known in SAFETENSORS_DTYPES.items() if known == dtype)
