"""Per-layer compile that stays on (no recompiles per caption length / bucket, no graph breaks, a loud recompile
limit) and op-level selective activation checkpointing.

The training test compiles with the ``aot_eager`` backend (AOTAutograd traces forward and backward with the
same guards and symbolic shapes inductor would get) and the forward-only tests with dynamo alone: inductor's
C++ code generation takes minutes per graph on a CPU and is not exercised here.
"""

from __future__ import annotations

import collections

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters

from helpers import make_trainer
from hidream_ft.bench import matmuls
from hidream_ft.config import ParallelConfig
from hidream_ft.data.collate import TextToImageCollator
from hidream_ft.data.samples import Sample
from hidream_ft.model import build_t2i_layout, collate_layouts
from hidream_ft.parallel import fsdp

WORDS = "a photo of a red circle on a blue background with a yellow triangle over a soft gradient".split()


@pytest.fixture()
def fresh_dynamo():
    """An empty compile cache and counters; dynamo's process-wide switches restored afterwards."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=False):
        yield
    torch._dynamo.reset()


class GraphCalls:
    """An aot_eager backend that counts the compiled graphs it builds and how often each kind runs."""

    def __init__(self):
        self.compiled = collections.Counter()
        self.runs = collections.Counter()
        self.backend = aot_autograd(fw_compiler=self._compiler("forward"), bw_compiler=self._compiler("backward"))

    def _compiler(self, kind):
        def compile_graph(graph, example_inputs):
            self.compiled[kind] += 1
            boxed = make_boxed_func(graph.forward)

            def run(args):
                self.runs[kind] += 1
                return boxed(args)

            run._boxed_call = True
            return run

        return compile_graph


def caption(words: int, offset: int = 0) -> str:
    return " ".join((WORDS * 4)[offset: offset + words])


def batch_of(trainer, side: int, words: int, padded: bool):
    """Two side×side images, the first with ``words`` caption words; ``padded``: the second's caption is shorter
    (left padding, a key mask)."""
    collate = TextToImageCollator(trainer.tokenizer, trainer.tokens, 512)
    g = torch.Generator().manual_seed(words)
    samples = [Sample(torch.rand(3, side, side, generator=g) * 2 - 1, caption(words - 3 * i * padded, i), f"s{i}",
                      noise_seed=i) for i in range(2)]
    return collate(samples)


def test_compiled_layers_never_recompile_over_caption_lengths_and_buckets(tiny_checkpoint, tmp_path, monkeypatch,
                                                                           fresh_dynamo):
    """LoRA training steps with compiled decoder layers: after a warm-up (a static graph, then one with symbolic
    sizes, then the padded variant), 30 more caption lengths over 3 buckets, padded or not, compile nothing new,
    break no graph, and every layer runs its compiled graph forward and backward."""
    calls = GraphCalls()
    compile_layers = fsdp.apply_compile
    # All but the first layer, whose input needs no gradient under LoRA: the others share their graphs, and
    # the first would only double the warm-up (its own graph per variant).
    monkeypatch.setattr(fsdp, "apply_compile", lambda layers: compile_layers(layers[1:], backend=calls.backend))
    trainer = make_trainer(tiny_checkpoint, tmp_path, "parallel.compile=true")
    compiled_layers = len(trainer.base.decoder_layers) - 1
    assert torch._dynamo.config.fail_on_recompile_limit_hit
    for words, padded in [(5, False), (7, False), (5, True)]:
        trainer.step([batch_of(trainer, 64, words, padded)])
    assert calls.compiled == {"forward": 3, "backward": 3}
    calls.runs.clear()
    cases = [((64, 96, 128)[words % 3], words, words % 2 == 1) for words in range(8, 38)]
    text_lengths = set()
    for side, words, padded in cases:
        batch = batch_of(trainer, side, words, padded)
        text_lengths.add(batch.layout.input_ids.shape[1])
        trainer.step([batch])
    assert len(text_lengths) == 30
    assert calls.compiled == {"forward": 3, "backward": 3}
    assert dict(counters["graph_break"]) == {}
    assert calls.runs == {"forward": compiled_layers * len(cases), "backward": compiled_layers * len(cases)}


def test_reaching_the_recompile_limit_is_an_error(tiny_model, tokenizer, tokens, fresh_dynamo):
    """A graph beyond dynamo's limit raises instead of running the layer eagerly (here the limit is 1 and the
    batch size changes from 2 to 1, which always compiles a new graph: size 1 is specialised)."""
    fsdp.apply_compile(tiny_model.decoder_layers[:1], backend="eager")

    def forward(size):
        batch = collate_layouts([build_t2i_layout(tokenizer, tokens, caption(4), 64, 64)] * size, tokens.pad)
        return tiny_model(**batch.model_inputs(), vinputs=torch.randn(size, batch.num_target_tokens, 3072),
                          timestep=torch.rand(size))

    with torch._dynamo.config.patch(recompile_limit=1):
        forward(2)
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            forward(1)


@pytest.mark.parametrize("attention", ["split", "dense", "flex"])
def test_compiled_layers_match_eager_for_every_attention_kind(tiny_model, tokenizer, tokens, fresh_dynamo,
                                                                attention):
    """Forward only (FlexAttention has no CPU backward), dynamo without a backend compiler: after a static and
    a symbolic graph a third caption length compiles nothing and equals the eager forward."""
    tiny_model.attention = attention

    def forward(words):
        batch = collate_layouts([build_t2i_layout(tokenizer, tokens, caption(words), 64, 64)] * 2, tokens.pad)
        g = torch.Generator().manual_seed(words)
        with torch.no_grad():
            return tiny_model(**batch.model_inputs(), vinputs=torch.randn(2, batch.num_target_tokens, 3072,
                                                                          generator=g),
                              timestep=torch.full((2,), 0.5))

    eager = forward(9)
    fsdp.apply_compile(tiny_model.decoder_layers, backend="eager")
    forward(4), forward(6)
    graphs = counters["stats"]["unique_graphs"]
    torch.testing.assert_close(forward(9), eager, rtol=0, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == graphs > 0
    assert dict(counters["graph_break"]) == {}


def test_compile_auto_is_on_for_cuda_only():
    assert ParallelConfig().compile == "auto"
    assert fsdp.compile_enabled("auto", "cuda") and not fsdp.compile_enabled("auto", "cpu")
    assert fsdp.compile_enabled(True, "cpu") and not fsdp.compile_enabled(False, "cuda")


def trainable(model) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters under names without the checkpoint wrapper's."""
    return {name.replace("._checkpoint_wrapped_module", ""): p for name, p in model.named_parameters()
            if p.requires_grad}


def lora_step(tiny_checkpoint, tmp_path, ac: str):
    """One LoRA forward/backward of the tiny model with ``ac``: (adapter gradients, forward matmuls,
    backward matmuls)."""
    trainer = make_trainer(tiny_checkpoint, tmp_path / ac, f"parallel.activation_checkpointing='{ac}'")
    g = torch.Generator().manual_seed(0)
    # Non-zero up-projections, so that the down-projections get gradients too.
    with torch.no_grad():
        for name, param in sorted(trainable(trainer.model).items()):
            local = param.to_local() if hasattr(param, "to_local") else param
            local.copy_(torch.randn(local.shape, generator=g) * 0.1)
    batch = batch_of(trainer, 64, 6, padded=True)
    inputs = batch.model_inputs(batch.x0)
    forward, backward = matmuls(), matmuls()
    with forward:
        out = trainer.model(**inputs, timestep=torch.full((2,), 0.5), output_tokens=batch.layout.num_target_tokens)
    with backward:
        out.square().mean().backward()
    grads = {name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for name, p in trainable(trainer.model).items()}
    return grads, forward.count, backward.count


def test_op_level_checkpointing_keeps_gradients_and_recomputes_no_matmul(tiny_checkpoint, tmp_path):
    reference, forward, backward = lora_step(tiny_checkpoint, tmp_path, "none")
    grads, op_forward, op_backward = lora_step(tiny_checkpoint, tmp_path, "op")
    _, full_forward, full_backward = lora_step(tiny_checkpoint, tmp_path, "full")
    assert grads.keys() == reference.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=0, atol=1e-6, msg=name)
    assert forward == op_forward == full_forward > 0
    assert op_backward == backward  # every saved matmul is reused
    assert full_backward > backward  # the whole-layer checkpoint reruns the forward's matmuls


def test_op_mode_checkpoints_every_layer_and_selective_every_kth():
    assert fsdp.checkpointed_layer_indices(ParallelConfig(activation_checkpointing="op"), 4) == [0, 1, 2, 3]
    assert fsdp.checkpointed_layer_indices(ParallelConfig(activation_checkpointing="selective", ac_every=3), 7) \
        == [0, 3, 6]


def test_the_adapter_a_run_starts_from_does_not_depend_on_checkpointing(tiny_checkpoint, tmp_path):
    def initial(ac: str) -> dict[str, torch.Tensor]:
        trainer = make_trainer(tiny_checkpoint, tmp_path / ac, f"parallel.activation_checkpointing='{ac}'")
        return {name: p.detach().clone() for name, p in trainable(trainer.model).items()}

    plain, wrapped = initial("none"), initial("full")
    assert plain.keys() == wrapped.keys() and any(t.abs().sum() > 0 for t in plain.values())
    for name, tensor in plain.items():
        assert torch.equal(tensor, wrapped[name]), name
