"""The training step on the device: no host reads outside logging steps, a non-finite step skipped by the
optimizer itself, and a plain (FSDP-free) module in one process."""

import collections

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import CAPTIONS, make_trainer, noise_samples
from hidream_ft.config import DiffusionConfig, ParallelConfig
from hidream_ft.data.collate import TextToImageCollator
from hidream_ft.model import load_model
from hidream_ft.parallel.distributed import build_mesh, init_distributed
from hidream_ft.parallel.fsdp import apply_activation_checkpointing, parallelize
from hidream_ft.trainer import TrainingAborted, compute_loss


class CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))

    @property
    def host_reads(self) -> int:
        """``.item()``, ``float(t)``, ``bool(t)``: on an accelerator each one waits for the device."""
        return self.counts[torch.ops.aten._local_scalar_dense.default]


def fixed_batch(trainer):
    return TextToImageCollator(trainer.tokenizer, trainer.tokens, 128)(noise_samples(CAPTIONS[:2]))


@pytest.mark.parametrize("options", [[], ["train.mode='full'", "optim.grad_clip=1.0"],
                                     ["train.mode='full'", "ema.enabled=true"]])
def test_a_steady_state_step_reads_nothing_on_the_host_and_a_logging_step_does(tiny_checkpoint, tmp_path, options):
    trainer = make_trainer(tiny_checkpoint, tmp_path, *options)
    batch = fixed_batch(trainer)
    for _ in range(2):  # optimizer state created, one step's values pending
        trainer.step([batch], read=False)
    with CountOps() as quiet:
        trainer.step([batch], read=False)
    with CountOps() as logging:
        trainer.step([batch], read=True)
    print(f"host reads: steady-state step {quiet.host_reads}, logging step {logging.host_reads}")
    assert quiet.host_reads == 0
    assert logging.host_reads >= 2  # the counter sees reads: loss and grad-norm at least
    assert [reading.step for reading in trainer.readings] == [1, 2, 3, 4]
    assert all(reading.loss == reading.loss for reading in trainer.readings)


def test_a_skipped_step_leaves_params_moments_and_step_count_untouched(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path, "train.mode='full'")
    good, bad = fixed_batch(trainer), fixed_batch(trainer)
    bad.x0[0, 0, 0] = float("inf")
    trainer.step([good], read=False)
    state = {name: {key: value.detach().clone() for key, value in trainer.optimizer.state[param].items()}
             for name, param in trainer.model.named_parameters() if param.requires_grad}
    params = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    trainer.step([bad], read=False)
    trainer.flush()
    assert trainer.skipped_total == 1 and trainer.skipped_in_a_row == 1
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.detach(), params[name]), name
        if param.requires_grad:
            saved = trainer.optimizer.state[param]
            assert saved["step"].item() == 1.0, name
            assert all(torch.equal(saved[key], state[name][key]) for key in ("exp_avg", "exp_avg_sq")), name
    trainer.step([good], read=False)
    trainer.flush()
    assert trainer.skipped_in_a_row == 0 and trainer.skipped_total == 1
    assert trainer.optimizer.state[trainer.params[0]]["step"].item() == 2.0


@pytest.mark.parametrize("lag_reads", [True, False], ids=["lagged as on cuda", "at once as on cpu"])
def test_a_diverged_run_aborts_when_its_step_values_are_read(tiny_checkpoint, tmp_path, lag_reads):
    trainer = make_trainer(tiny_checkpoint, tmp_path, "train.mode='full'", "train.max_consecutive_skips=1")
    assert trainer.lag_reads is False  # a CPU trainer reads at once; the lagged path is forced here
    trainer.lag_reads = lag_reads
    bad = fixed_batch(trainer)
    bad.x0[0, 0, 0] = float("nan")
    trainer.step([bad], read=False)
    assert [reading.step for reading in trainer.readings] == ([] if lag_reads else [1])
    if lag_reads:
        trainer.step([bad], read=False)  # reads step 1: one skip in a row is allowed
    with pytest.raises(TrainingAborted, match="2 consecutive steps with a non-finite"):
        trainer.step([bad], read=False)  # reads step 2 (lagged: while dispatching step 3)
    assert trainer.skipped_total == (3 if lag_reads else 2)


def test_the_votes_are_taken_just_before_the_all_reduce_and_summed_into_the_step_values(tiny_checkpoint, tmp_path):
    """A signal caught during the forward/backward counts in that step (the preemption stop comes at once)."""
    trainer = make_trainer(tiny_checkpoint, tmp_path)
    batch = fixed_batch(trainer)
    taken = []
    trainer.model.register_forward_hook(lambda *_: taken.append("forward"))
    trainer.step([batch], read=False, sums=lambda: taken.append("votes") or [1.0, 0.0])
    assert taken == ["forward", "votes"]
    assert [(reading.step, reading.sums) for reading in trainer.readings] == [(1, [1.0, 0.0])]


def load_tiny(checkpoint, tokenizer, prepare):
    torch.manual_seed(0)
    return load_model(checkpoint, dtype=torch.float32, tokenizer=tokenizer, prepare=prepare)


def loss_and_ops(model, batch):
    """One forward and backward on ``batch``: the loss, the gradients, and the aten ops they dispatched."""
    torch.manual_seed(0)
    with CountOps() as ops:
        loss = compute_loss(model, batch, DiffusionConfig())
        loss.backward()
    grads = {name: param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
             for name, param in model.named_parameters() if param.grad is not None}
    return loss.detach(), grads, ops.counts.total()


def test_one_process_trains_a_plain_module_exactly_as_fsdp_on_one_rank_with_fewer_ops(tiny_checkpoint, tokenizer,
                                                                                        tokens):
    mesh = build_mesh(init_distributed(), hsdp=False)
    cfg = ParallelConfig(param_dtype="float32", compile=False, activation_checkpointing="full")

    def plain(base):
        parallelize(base, cfg, mesh)
        return base

    def fsdp(base):  # every unit sharded on the one-rank mesh, as this trainer did on one process before
        apply_activation_checkpointing(base.decoder_layers, cfg)
        policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for unit in [*base.decoder_layers, base.model.visual, base.model.language_model.embed_tokens, base]:
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        return base

    batch = TextToImageCollator(tokenizer, tokens, 128)(noise_samples(CAPTIONS[:2]))
    plain_model, sharded_model = load_tiny(tiny_checkpoint, tokenizer, plain), load_tiny(tiny_checkpoint, tokenizer, fsdp)
    assert not isinstance(plain_model, FSDPModule)
    assert not any(isinstance(p, DTensor) for p in plain_model.parameters())
    assert all(isinstance(layer, CheckpointWrapper) for layer in plain_model.decoder_layers)
    plain_loss, plain_grads, plain_ops = loss_and_ops(plain_model, batch)
    sharded_loss, sharded_grads, sharded_ops = loss_and_ops(sharded_model, batch)
    assert torch.allclose(plain_loss, sharded_loss, rtol=0, atol=1e-6)
    assert plain_grads.keys() == sharded_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, sharded_grads[name], rtol=0, atol=1e-6), name
    print(f"aten ops per forward+backward: plain {plain_ops}, FSDP on one rank {sharded_ops}")
    assert plain_ops < sharded_ops


def test_one_process_computes_in_param_dtype_under_autocast_and_keeps_fp32_masters(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path, "train.mode='full'", "parallel.param_dtype='bfloat16'")
    batch = fixed_batch(trainer)
    losses = [trainer.step([batch])["loss"] for _ in range(6)]
    assert losses[-1] < losses[0], losses
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert trainer.base.model.visual.patch_embed.proj.weight.dtype == torch.bfloat16  # frozen: compute dtype
    assert not trainer.base.vision_must_run()
    with torch.no_grad():
        inputs = batch.model_inputs(batch.x0)
        out = trainer.base(**inputs, timestep=torch.ones(batch.size), output_tokens=batch.layout.num_target_tokens)
    assert out.dtype == torch.bfloat16
