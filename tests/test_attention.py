"""The hybrid attention: the reference rule (padding, packed documents), and `split` / `flex` against the dense
reference, alone on random q/k/v and in the whole tiny model, in fp32."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch.utils._python_dispatch import TorchDispatchMode

from hidream_ft.model.attention import (
    build_attention_layout, dense_attention_mask, flex_block_mask, hybrid_attention, resolve_attention,
)
from hidream_ft.model.conditioning import ConditionProcessor
from hidream_ft.model.errors import ModelInputError
from hidream_ft.model.layout import build_t2i_layout, collate_layouts
from hidream_ft.model.patches import pixels_from_uint8
from hidream_ft.model.reference_layout import build_reference_inputs, generation_inputs

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
TOLERANCE = dict(rtol=0, atol=1e-6)


def random_qkv(batch, size, seed=0):
    """q/k/v as the stock layer hands them over: [B, S, heads, D] tensors viewed as [B, heads, S, D]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, size, HEADS, HEAD_DIM, generator=g).transpose(1, 2)
    k = torch.randn(batch, size, KV_HEADS, HEAD_DIM, generator=g).transpose(1, 2)
    v = torch.randn(batch, size, KV_HEADS, HEAD_DIM, generator=g).transpose(1, 2)
    return q, k, v


def attend(kind, qkv, token_types, attention_mask=None, document_ids=None, num_text_tokens=None):
    layout = build_attention_layout(kind, token_types=token_types, attention_mask=attention_mask,
                                    document_ids=document_ids, num_text_tokens=num_text_tokens)
    out, weights = hybrid_attention(None, *qkv, layout, scaling=HEAD_DIM**-0.5)
    assert weights is None
    return out


def left_padded(text_lengths, image_tokens):
    """[B, S] token types and attention mask of left-padded samples: text (its last token the tms token), image."""
    width = max(text_lengths)
    types, mask = [], []
    for length in text_lengths:
        pad = width - length
        types.append([0] * pad + [0] * (length - 1) + [3] + [1] * image_tokens)
        mask.append([0] * pad + [1] * (length + image_tokens))
    return torch.tensor(types), torch.tensor(mask), width


def packed(rows, width):
    """[R, S] token types, attention mask and document ids of rows packed with (text, image) documents, then
    tail padding (document -1); also each document's (row, start, end)."""
    types, mask, docs, spans = [], [], [], []
    for r, documents in enumerate(rows):
        row_types, row_docs = [], []
        for d, (text, image) in enumerate(documents):
            spans.append((r, len(row_types), len(row_types) + text + image))
            row_types += [0] * (text - 1) + [3] + [1] * image
            row_docs += [d] * (text + image)
        pad = width - len(row_types)
        types.append(row_types + [0] * pad)
        mask.append([1] * len(row_types) + [0] * pad)
        docs.append(row_docs + [-1] * pad)
    return torch.tensor(types), torch.tensor(mask), torch.tensor(docs), spans


# ---------------------------------------------------------------- the rule


def test_reference_rule_on_a_packed_row_by_hand():
    # document 0: text, tms, 2 image tokens; document 1: text, tms, 1 image token; one padding token
    types = torch.tensor([[0, 3, 1, 1, 0, 3, 1, 0]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]]).bool()
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1]])
    expected = [[1, 0, 0, 0, 0, 0, 0, 0],
                [1, 1, 1, 1, 0, 0, 0, 0],
                [1, 1, 1, 1, 0, 0, 0, 0],
                [1, 1, 1, 1, 0, 0, 0, 0],
                [0, 0, 0, 0, 1, 0, 0, 0],
                [0, 0, 0, 0, 1, 1, 1, 0],
                [0, 0, 0, 0, 1, 1, 1, 0],
                [0, 0, 0, 0, 0, 0, 0, 1]]  # padding sees only itself: no empty row
    assert dense_attention_mask(types, valid, docs)[0, 0].int().tolist() == expected


def test_reference_rule_with_left_padding_by_hand():
    types = torch.tensor([[0, 0, 0, 3, 1], [0, 0, 0, 3, 1]])
    valid = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]).bool()
    mask = dense_attention_mask(types, valid)[:, 0].int().tolist()
    assert mask[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert mask[1] == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]


def test_the_block_mask_allows_exactly_the_reference_mask():
    types, mask, docs, _ = packed([[(5, 8), (9, 4), (3, 6)], [(7, 3), (2, 10), (4, 4)]], 40)
    block_mask = flex_block_mask(types, mask.bool(), docs)
    b, q, k = torch.meshgrid(torch.arange(2), torch.arange(40), torch.arange(40), indexing="ij")
    from_mask_mod = block_mask.mask_mod(b, torch.zeros_like(b), q, k)
    assert torch.equal(from_mask_mod, dense_attention_mask(types, mask.bool(), docs)[:, 0])
    assert block_mask.shape == (2, 1, 40, 40)


# ---------------------------------------------------------------- the attention function on random q/k/v


@pytest.mark.parametrize("kind", ["split", "flex"])
def test_unpadded_batch_equals_dense(kind):
    types, _, width = left_padded([9, 9], image_tokens=30)
    qkv = random_qkv(2, types.shape[1])
    dense = attend("dense", qkv, types, num_text_tokens=width)
    out = attend(kind, qkv, types, num_text_tokens=width)
    assert out.shape == (2, types.shape[1], HEADS, HEAD_DIM)
    torch.testing.assert_close(out, dense, **TOLERANCE)


@pytest.mark.parametrize("kind", ["split", "flex"])
def test_left_padded_batch_of_different_text_lengths_equals_dense(kind):
    types, mask, width = left_padded([14, 6, 10], image_tokens=25)
    qkv = random_qkv(3, types.shape[1], seed=1)
    dense = attend("dense", qkv, types, mask, num_text_tokens=width)
    out = attend(kind, qkv, types, mask, num_text_tokens=width)
    valid = mask.bool()  # padding rows see only themselves: their values do not matter
    torch.testing.assert_close(out[valid], dense[valid], **TOLERANCE)


@pytest.mark.parametrize("kind", ["dense", "flex"])
def test_packed_rows_equal_each_document_alone(kind):
    types, mask, docs, spans = packed([[(5, 8), (9, 4), (3, 6)], [(7, 3), (2, 10), (4, 4)]], 40)
    q, k, v = random_qkv(2, 40, seed=2)
    out = attend(kind, (q, k, v), types, mask, docs)
    torch.testing.assert_close(out[mask.bool()], attend("dense", (q, k, v), types, mask, docs)[mask.bool()],
                               **TOLERANCE)
    for row, start, end in spans:
        alone = attend("dense", tuple(t[row : row + 1, :, start:end] for t in (q, k, v)),
                       types[row : row + 1, start:end])
        torch.testing.assert_close(out[row : row + 1, start:end], alone, **TOLERANCE)


def test_flex_output_needs_no_copy_into_the_layers_layout():
    types, mask, docs, _ = packed([[(5, 8), (9, 4)]], 32)
    out = attend("flex", random_qkv(1, 32), types, mask, docs)
    assert out.shape == (1, 32, HEADS, HEAD_DIM) and out.is_contiguous()


def test_split_refuses_packed_rows():
    types, mask, docs, _ = packed([[(5, 8), (9, 4)]], 32)
    with pytest.raises(ModelInputError, match="packed rows"):
        build_attention_layout("split", token_types=types, attention_mask=mask, document_ids=docs, num_text_tokens=5)


def test_flex_refuses_training_on_cpu_with_a_clear_error():
    types, _, _ = left_padded([6], image_tokens=8)
    q, k, v = random_qkv(1, types.shape[1])
    with pytest.raises(ModelInputError, match="no backward on CPU"):
        attend("flex", (q.requires_grad_(), k, v), types)


def test_auto_is_flex_on_cuda_and_split_elsewhere():
    assert resolve_attention("auto", "cuda") == "flex"
    assert resolve_attention("auto", torch.device("cuda:1")) == "flex"
    assert resolve_attention("auto", "cpu") == "split"
    assert resolve_attention("auto", "cpu", packed=True) == "dense"
    assert [resolve_attention(kind, "cuda") for kind in ("dense", "split", "flex")] == ["dense", "split", "flex"]
    with pytest.raises(ValueError, match="expected auto, dense, split or flex"):
        resolve_attention("flash", "cpu")


# ---------------------------------------------------------------- graph friendliness of the flex layout


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_building_the_flex_layout_never_syncs_with_the_host():
    types, mask, docs, _ = packed([[(5, 8), (9, 4), (3, 6)], [(7, 3), (2, 10), (4, 4)]], 40)
    with CountOps() as control:
        bool(mask.any())  # what a host sync looks like to the counter
    assert "_local_scalar_dense.default" in control.names
    with CountOps() as counted:
        build_attention_layout("flex", token_types=types, attention_mask=mask, document_ids=docs)
    assert counted.names and "_local_scalar_dense.default" not in counted.names


def test_the_block_mask_build_traces_into_one_graph():
    types, mask, docs, _ = packed([[(5, 8), (9, 4), (3, 6)]], 40)
    explanation = torch._dynamo.explain(flex_block_mask)(types, mask.bool(), docs)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0


def test_a_compiled_layer_keeps_its_graph_for_each_new_block_mask():
    def attention_layer(q, k, v, layout):
        return hybrid_attention(None, q, k, v, layout, scaling=HEAD_DIM**-0.5)[0]

    counter = CompileCounter()
    compiled = torch.compile(attention_layer, backend=counter)
    for rows in ([(5, 8), (9, 4), (3, 6)], [(7, 3), (2, 10), (4, 4)], [(2, 20), (9, 4)]):
        types, mask, docs, _ = packed([rows], 40)
        layout = build_attention_layout("flex", token_types=types, attention_mask=mask, document_ids=docs)
        qkv = random_qkv(1, 40, seed=len(rows))
        dense = attend("dense", qkv, types, mask, docs)
        torch.testing.assert_close(compiled(*qkv, layout)[mask.bool()], dense[mask.bool()], **TOLERANCE)
    assert counter.frame_count == 1  # one trace for every forward's fresh mask_mod closure of the same shape


# ---------------------------------------------------------------- the whole tiny model: flex against dense


def _forward(model, kind, inputs, timestep):
    model.attention = kind
    with torch.no_grad():
        return model(**inputs, timestep=timestep)


def _assert_flex_equals_dense(model, inputs, timestep):
    assert inputs["attention_mask"] is not None  # the batch is padded
    torch.testing.assert_close(_forward(model, "flex", inputs, timestep), _forward(model, "dense", inputs, timestep),
                               **TOLERANCE)


def test_model_t2i_batch_with_flex_equals_dense(tiny_model, tokenizer, tokens):
    prompts = ["a red circle", "the quick brown fox jumps over the lazy dog"]
    batch = collate_layouts([build_t2i_layout(tokenizer, tokens, p, 64, 96) for p in prompts], tokens.pad)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, batch.num_target_tokens, 3072, generator=g)
    _assert_flex_equals_dense(tiny_model, generation_inputs(batch, z, None), torch.rand(2, generator=g))


@pytest.mark.parametrize("references", [1, 2], ids=["edit", "ip"])
def test_model_reference_batch_with_flex_equals_dense(tiny_checkpoint, tiny_model, tokenizer, tokens, references):
    processor = ConditionProcessor.from_pretrained(tiny_checkpoint)
    g = torch.Generator().manual_seed(references)
    refs = [pixels_from_uint8(torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8))
            for _ in range(references)]
    layout, cond = build_reference_inputs(tokenizer, tokens, processor, "add a red hat to the dog", refs, 64, 64,
                                          guided=True)  # the conditional and the shorter unconditional row
    z = torch.randn(2, layout.num_target_tokens, 3072, generator=g)
    _assert_flex_equals_dense(tiny_model, generation_inputs(layout, z, cond), torch.rand(2, generator=g))
