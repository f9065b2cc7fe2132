"""HiDream-O1's hybrid attention (text causal, timestep and image tokens attend to all), as a transformers
attention function for the stock Qwen3-VL layers: ``dense`` (the reference mask) or ``split`` (two SDPA
calls); docs/sampling.md, "Model internals"."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTENTION_NAME = "hidream_o1"


@dataclass
class AttentionLayout:
    """Passed to the decoder layers in place of a mask tensor."""

    kind: str  # "dense" | "split"
    gen_start: int  # index of the first gen token (the tms token) in every sample of the batch
    key_valid: torch.Tensor | None  # [B, S] bool, None when nothing is padded
    dense_mask: torch.Tensor | None = None  # [B, 1, S, S] bool, only for kind == "dense"


def dense_attention_mask(token_types: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """The reference mask: allowed[b, q, k]; every query may at least see itself (no empty rows)."""
    gen = token_types > 0
    size = gen.shape[1]
    idx = torch.arange(size, device=gen.device)
    causal = idx[None, :] <= idx[:, None]  # [q, k]
    allowed = gen[:, :, None] | (causal[None] & ~gen[:, None, :])
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    allowed = allowed | torch.eye(size, dtype=torch.bool, device=gen.device)[None]
    return allowed[:, None]


def build_attention_layout(
    kind: str, num_text_tokens: int, token_types: torch.Tensor, attention_mask: torch.Tensor | None
) -> AttentionLayout:
    key_valid = None if attention_mask is None else attention_mask.bool()
    if kind == "dense":
        return AttentionLayout("dense", num_text_tokens - 1, key_valid, dense_attention_mask(token_types, key_valid))
    if kind == "split":
        return AttentionLayout("split", num_text_tokens - 1, key_valid)
    raise ValueError(f"unknown attention implementation {kind!r}; expected 'split' or 'dense'")


def _sdpa(q, k, v, mask, scaling, is_causal=False):
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=q.shape[1] != k.shape[1]
    )


def hybrid_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention-function signature: q/k/v are [B, heads, S, D]; returns ([B, S, heads, D], None)."""
    layout: AttentionLayout = attention_mask
    if not isinstance(layout, AttentionLayout):
        raise TypeError("HiDream-O1 attention needs an AttentionLayout; call the model's generation forward")
    if layout.kind == "dense":
        out = _sdpa(query, key, value, layout.dense_mask, scaling)
    else:
        g = layout.gen_start
        valid = layout.key_valid
        if valid is None:
            text = _sdpa(query[:, :, :g], key[:, :, :g], value[:, :, :g], None, scaling, is_causal=True)
            gen = _sdpa(query[:, :, g:], key, value, None, scaling)
        else:
            idx = torch.arange(g, device=query.device)
            causal = (idx[None, :] <= idx[:, None])[None] & valid[:, None, :g]
            causal = causal | torch.eye(g, dtype=torch.bool, device=query.device)[None]
            text = _sdpa(query[:, :, :g], key[:, :, :g], value[:, :, :g], causal[:, None], scaling)
            gen = _sdpa(query[:, :, g:], key, value, valid[:, None, None, :], scaling)
        out = torch.cat([text, gen], dim=2)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, hybrid_attention)
