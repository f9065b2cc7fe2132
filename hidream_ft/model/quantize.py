"""A quantized frozen base for LoRA: the decoder's linear weights stored in NF4 (bitsandbytes) or in fp8 with
one scale per output row (torchao), computing in bf16 (docs/memory.md)."""

from __future__ import annotations

import torch
from torch import nn

from hidream_ft.errors import UserError
from hidream_ft.model.hidream import HiDreamO1

# The linears of every decoder layer (name → the block holding it): the bulk of the weights, LoRA's default
# targets, and what a quantized base stores quantized (the heads, norms, embeddings and the ViT stay as loaded).
DECODER_LINEARS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
COMPUTE_DTYPE = torch.bfloat16


class QuantizationError(UserError):
    """The library a base quantization needs is missing."""


def _nf4_linear(linear: nn.Linear) -> nn.Module:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise QuantizationError(
            "model.base_quantization = 'nf4' needs bitsandbytes: pip install -e '.[quant]'") from None
    weight = linear.weight.detach().to(COMPUTE_DTYPE)
    quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=COMPUTE_DTYPE, quant_type="nf4", device="meta")
    quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        quantized.bias = nn.Parameter(linear.bias.detach().to(COMPUTE_DTYPE), requires_grad=False)
    return quantized.to(weight.device)  # moving a Params4bit quantizes it, on CPU as on CUDA


def _fp8_linear(linear: nn.Linear) -> nn.Module:
    try:
        from torchao.quantization import Float8WeightOnlyConfig, PerRow, quantize_
    except ImportError:
        raise QuantizationError("model.base_quantization = 'fp8' needs torchao: pip install -e '.[quant]'") from None
    linear.requires_grad_(False)
    linear.to(COMPUTE_DTYPE)
    quantize_(linear, Float8WeightOnlyConfig(granularity=PerRow()))
    return linear


QUANTIZERS = {"nf4": _nf4_linear, "fp8": _fp8_linear}


@torch.no_grad()
def quantize_decoder_linears(model: HiDreamO1, method: str) -> None:
    """Replace the decoder layers' linears of a loaded (not meta) model by frozen ``method`` ones, in place,
    before any LoRA wraps them. Numerics change (that is the point): quantized weights are rounded, and these
    layers compute in bf16."""
    if method == "none":
        return
    quantize = QUANTIZERS[method]
    for layer in model.decoder_layers:
        for name, block_name in DECODER_LINEARS.items():
            block = getattr(layer, block_name)
            quantized = quantize(getattr(block, name))
            quantized.base_quantization = method
            setattr(block, name, quantized)


def quantized_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The parameters of the quantized linears (also under a PEFT wrapper): what FSDP must leave alone, since
    a quantized tensor cannot be sharded; each rank holds the whole quantized base."""
    return {p for m in model.modules() if hasattr(m, "base_quantization") for p in m.parameters()}
