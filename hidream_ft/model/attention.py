"""HiDream-O1's hybrid attention (text causal, timestep and image tokens attend to their whole sample), as a
transformers attention function for the stock Qwen3-VL layers: ``dense`` (the reference mask), ``split`` (two
SDPA calls) or ``flex`` (FlexAttention with a block mask, also for packed rows); docs/sampling.md, "Model
internals"."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import AttentionInterface

from hidream_ft.model.errors import ModelInputError

ATTENTION_NAME = "hidream_o1"


@dataclass
class AttentionLayout:
    """Passed to the decoder layers in place of a mask tensor; built once per forward, shared by every layer."""

    kind: str  # "dense" | "split" | "flex" ("auto" is resolved before)
    # dense: the [B, 1, S, S] reference mask; split: the text rows' [B, 1, T-1, T-1] causal mask over valid keys
    # (None when nothing is padded: plain causal SDPA)
    mask: torch.Tensor | None = None
    gen_start: int = 0  # split: index of the first gen token (the tms token) in every sample of the batch
    gen_mask: torch.Tensor | None = None  # split: [B, 1, 1, S] valid keys of the gen rows; None when unpadded
    block_mask: BlockMask | None = None  # flex


def resolve_attention(kind: str, device: torch.device | str, packed: bool = False) -> str:
    """The attention kind to run: ``auto`` is ``flex`` on CUDA (compiled kernels, packed rows, no S×S mask);
    elsewhere FlexAttention has no backward, so ``auto`` is ``split``, or ``dense`` for packed rows, which
    ``split`` cannot hold."""
    if kind == "auto":
        if torch.device(device).type == "cuda":
            return "flex"
        return "dense" if packed else "split"
    if kind not in ("dense", "split", "flex"):
        raise ValueError(f"unknown attention implementation {kind!r}; expected auto, dense, split or flex")
    return kind


def _allowed(q, k, gen_q, gen_k, valid_k, doc_q, doc_k):
    """The attention rule on broadcastable index/value tensors (one home for the dense mask and the flex
    mask_mod): same document, and either a gen query (sees its whole document) or a text key at or before the
    query; only valid keys; and every query sees itself, so no row is empty. Text precedes the gen tokens within
    a document, so ``k <= q`` restricted to text keys is the text-causal rule."""
    allowed = gen_q | ((k <= q) & ~gen_k)
    if valid_k is not None:
        allowed = allowed & valid_k
    if doc_q is not None:
        allowed = allowed & (doc_q == doc_k)
    return allowed | (q == k)


def dense_attention_mask(
    token_types: torch.Tensor, key_valid: torch.Tensor | None, document_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """The reference mask: allowed[b, 0, q, k] as a [B, 1, S, S] bool tensor."""
    gen = token_types > 0
    idx = torch.arange(gen.shape[1], device=gen.device)
    allowed = _allowed(
        idx[:, None], idx[None, :], gen[:, :, None], gen[:, None, :],
        None if key_valid is None else key_valid[:, None, :],
        None if document_ids is None else document_ids[:, :, None],
        None if document_ids is None else document_ids[:, None, :],
    )
    return allowed[:, None]


def flex_block_mask(
    token_types: torch.Tensor, key_valid: torch.Tensor | None, document_ids: torch.Tensor | None = None
) -> BlockMask:
    """The reference rule as a FlexAttention block mask over [B, S, S] (one per batch, broadcast over heads).
    Pure tensor code without host syncs, so it also runs under ``torch.compile``; the sequence need not be a
    multiple of the 128-token block (the last block is partial)."""
    gen = token_types > 0
    batch, size = gen.shape

    def mask_mod(b, h, q, k):
        return _allowed(
            q, k, gen[b, q], gen[b, k],
            None if key_valid is None else key_valid[b, k],
            None if document_ids is None else document_ids[b, q],
            None if document_ids is None else document_ids[b, k],
        )

    return create_block_mask(mask_mod, batch, None, size, size, device=gen.device)


@functools.cache
def _compiled(fn):
    return torch.compile(fn)


def _fused_on_cuda(fn, device: torch.device):
    """``fn`` compiled on CUDA unless already traced by an enclosing compile (a compiled decoder layer): eager
    FlexAttention materialises the S×S scores and eager ``create_block_mask`` the S×S bool mask. CPU stays
    eager (the tests' path)."""
    if device.type == "cuda" and not torch.compiler.is_compiling():
        return _compiled(fn)
    return fn


def build_attention_layout(
    kind: str,
    token_types: torch.Tensor,
    attention_mask: torch.Tensor | None,
    document_ids: torch.Tensor | None = None,
    num_text_tokens: int | None = None,
) -> AttentionLayout:
    """The per-forward attention state for [B, S] ``token_types`` (0 text, > 0 tms/image), ``attention_mask``
    (1 real, 0 padding; None: nothing padded) and, for packed rows, ``document_ids`` (each token's sample index
    within its row, -1 on padding). ``split`` needs ``num_text_tokens`` (the left-padded text width, whose last
    token is the tms token) and takes no packed rows."""
    kind = resolve_attention(kind, token_types.device, packed=document_ids is not None)
    key_valid = None if attention_mask is None else attention_mask.bool()
    if kind == "dense":
        return AttentionLayout("dense", mask=dense_attention_mask(token_types, key_valid, document_ids))
    if kind == "flex":
        build = _fused_on_cuda(flex_block_mask, token_types.device)
        return AttentionLayout("flex", block_mask=build(token_types, key_valid, document_ids))
    if document_ids is not None:
        raise ModelInputError("attention 'split' needs one sample per row; packed rows (document_ids) need "
                              "model.attention 'flex' (or 'auto' on CUDA) or 'dense'")
    if num_text_tokens is None:
        raise ValueError("attention 'split' needs num_text_tokens, the left-padded text width")
    gen_start = num_text_tokens - 1
    if key_valid is None:
        return AttentionLayout("split", gen_start=gen_start)
    idx = torch.arange(gen_start, device=key_valid.device)
    text_mask = (idx[None, :] <= idx[:, None])[None] & key_valid[:, None, :gen_start]
    text_mask = text_mask | torch.eye(gen_start, dtype=torch.bool, device=key_valid.device)[None]
    return AttentionLayout("split", mask=text_mask[:, None], gen_start=gen_start, gen_mask=key_valid[:, None, None, :])


def _sdpa(q, k, v, mask, scaling, is_causal=False):
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=q.shape[1] != k.shape[1]
    )


def _flex(query, key, value, block_mask, scaling):
    if query.device.type == "cpu" and any(t.requires_grad for t in (query, key, value)):
        raise ModelInputError("attention 'flex' has no backward on CPU; train on CPU with model.attention "
                              "'split' (what 'auto' picks there) or 'dense'")
    attend = _fused_on_cuda(flex_attention, query.device)
    # The output takes the query's stride order; the stock layer's query is a [B, S, heads, D] tensor viewed as
    # [B, heads, S, D], so the transposed output below is already contiguous for its reshape.
    out = attend(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)


def hybrid_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention-function signature: q/k/v are [B, heads, S, D]; returns ([B, S, heads, D], None)."""
    layout: AttentionLayout = attention_mask
    if not isinstance(layout, AttentionLayout):
        raise TypeError("HiDream-O1 attention needs an AttentionLayout; call the model's generation forward")
    if layout.kind == "flex":
        return _flex(query, key, value, layout.block_mask, scaling), None
    if layout.kind == "dense":
        out = _sdpa(query, key, value, layout.mask, scaling)
    else:
        g = layout.gen_start
        text = _sdpa(query[:, :, :g], key[:, :, :g], value[:, :, :g], layout.mask, scaling,
                     is_causal=layout.mask is None)
        gen = _sdpa(query[:, :, g:], key, value, layout.gen_mask, scaling)
        out = torch.cat([text, gen], dim=2)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, hybrid_attention)
