"""The planner (python -m hidream_ft.plan) at the tiny shape: its byte counts against a real model, its peak
against the same tracker on a real step, sharding, the communication formula against the collectives a step
issues, the verdict and the command line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from hidream_ft import plan
from hidream_ft.bench import random_weights_loader, synthetic_batch, write_shape_dir
from hidream_ft.config import load_config
from hidream_ft.model.loading import build_meta_model, load_hf_config
from hidream_ft.parallel.distributed import init_distributed, shutdown
from hidream_ft.trainer import Trainer

# A 64×64 image (4 tokens) under a short caption: a step takes a second at the tiny shape.
SMALL = ["data.area=4096", "data.max_text_tokens=48", "train.batch_size=2"]
# The real step's peak (same tracker, real tensors) may differ from the fake one by this fraction.
PEAK_TOLERANCE = 0.02
# On a quantized base the fake step's peak exceeds the real one by up to this fraction (11% at the tiny shape).
QUANTIZED_PEAK_EXCESS = 0.15


@pytest.fixture(scope="module")
def shape_dir(tmp_path_factory) -> Path:
    return write_shape_dir(tmp_path_factory.mktemp("tiny-shape"), "tiny")


def tiny_config(shape_dir: Path, tmp_path: Path, *overrides: str):
    return load_config(None, [*SMALL, *overrides, *plan.planning_overrides(shape_dir, tmp_path / "run")])


@pytest.fixture(scope="module")
def plans(shape_dir, tmp_path_factory) -> dict:
    """Plans of a LoRA and a full fine-tune on 1 and 2 ranks (and HSDP on 4 ranks, 2 per node)."""
    tmp = tmp_path_factory.mktemp("plans")
    cases = {("lora", 1): (), ("lora", 2): (), ("full", 1): (), ("full", 2): (), ("full", 4): ("parallel.hsdp=true",)}
    return {(mode, gpus): plan.make_plan(tiny_config(shape_dir, tmp, f"train.mode={mode}", *extra), gpus,
                                         2 if gpus == 4 else 8, plan.GPUS["h100"])
            for (mode, gpus), extra in cases.items()}


def real_step(cfg) -> tuple[plan.StepMeasurement, int, int]:
    """The same step on real tensors, one process: the tracker's measurement, and the exact parameter bytes
    and trainable-parameter bytes of the real model. The 8-bit AdamW updates in place, as the planner plans it."""
    trainer = Trainer(cfg, init_distributed(), load=random_weights_loader(cfg.train.seed))
    try:
        load = plan.workload(cfg)
        batches = [synthetic_batch(trainer, load.side, load.batch, load.text_tokens)]
        with plan.gpu_optimizer_kernel():
            measured = plan.measure_step(trainer, batches)
        params = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
        trainable = sum(p.numel() * p.element_size() for p in trainer.params)
        return measured, params, trainable
    finally:
        shutdown()


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_byte_counts_and_peak_match_a_real_tiny_step(mode, plans, shape_dir, tmp_path):
    predicted = plans[(mode, 1)].step
    measured, params, trainable = real_step(tiny_config(shape_dir, tmp_path, f"train.mode={mode}"))
    assert predicted.parameter_bytes == params
    assert predicted.gradient_bytes == trainable  # one gradient per trainable parameter, in its dtype
    # AdamW: two moments in the parameter's dtype (and a 0-dim step counter, not counted)
    assert predicted.optimizer_bytes == measured.optimizer_bytes == 2 * trainable
    assert predicted.flops == measured.flops > 0
    assert predicted.peak_bytes == pytest.approx(measured.peak_bytes, rel=PEAK_TOLERANCE)
    assert predicted.peak_bytes > params + 3 * trainable  # activations on top of the persistent state


EIGHT_BIT = ["train.mode=full", "optim.name=adamw8bit"]
FUSED_BACKWARD = [*EIGHT_BIT, "optim.fused_backward=true", "optim.grad_clip=0"]


def eight_bit_state_bytes(cfg) -> int:
    """What ShardedAdamW8bit holds for the trainable parameters of the unsharded tiny model: per 8-bit matrix
    two moments of uint8 codes (one per element) and fp32 scales (one per 256-element block of each row); fp32
    moments for the rest."""
    trainer = Trainer(cfg, init_distributed(), load=random_weights_loader(cfg.train.seed))
    try:
        total = 0
        for p in trainer.params:
            if trainer.optimizer.is_8bit(p):
                rows, cols = p.shape[0], p[0].numel()
                total += 2 * (p.numel() + 4 * rows * -(-cols // 256))
            else:
                total += 2 * 4 * p.numel()
        return total
    finally:
        shutdown()


@pytest.mark.parametrize("overrides", [EIGHT_BIT, FUSED_BACKWARD], ids=["adamw8bit", "fused_backward"])
def test_eight_bit_optimizer_plans_like_a_real_tiny_step(overrides, shape_dir, tmp_path):
    cfg = tiny_config(shape_dir, tmp_path, *overrides)
    one, two = (plan.make_plan(cfg, gpus, 8, plan.GPUS["h100"]).step for gpus in (1, 2))
    measured, params, trainable = real_step(cfg)
    state = eight_bit_state_bytes(cfg)
    assert one.parameter_bytes == params
    assert one.optimizer_bytes == measured.optimizer_bytes == state
    assert two.optimizer_bytes * 2 == state  # the tiny matrices' rows split evenly over two ranks
    # Fused backward frees each gradient as soon as it has updated its parameter: none is left for a step.
    assert one.gradient_bytes == measured.gradient_bytes == (0 if "optim.fused_backward=true" in overrides
                                                             else trainable)
    assert one.flops == measured.flops > 0
    assert one.peak_bytes == pytest.approx(measured.peak_bytes, rel=PEAK_TOLERANCE)


@pytest.mark.parametrize("quantization", ["nf4", "fp8"])
def test_lora_on_a_quantized_base_plans_like_a_real_tiny_step(quantization, shape_dir, tmp_path):
    cfg = tiny_config(shape_dir, tmp_path, "train.mode=lora", f"model.base_quantization={quantization}")
    predicted = plan.make_plan(cfg, 1, 8, plan.GPUS["h100"]).step
    measured, params, trainable = real_step(cfg)
    assert predicted.parameter_bytes == params
    assert predicted.gradient_bytes == trainable
    assert predicted.optimizer_bytes == measured.optimizer_bytes == 2 * trainable
    assert predicted.flops == measured.flops > 0
    # The fake step holds more activation bytes than the CPU kernels of the quantized layers (docs/planning.md):
    # the prediction errs on the safe side, by at most this much.
    assert measured.peak_bytes < predicted.peak_bytes <= measured.peak_bytes * (1 + QUANTIZED_PEAK_EXCESS)


def test_two_ranks_halve_the_sharded_bytes(plans, shape_dir):
    one, two = plans[("full", 1)].step, plans[("full", 2)].step
    assert two.gradient_bytes * 2 == one.gradient_bytes
    assert two.optimizer_bytes * 2 == one.optimizer_bytes
    # At the peak the optimizer holds its moments (and 4-byte step counters), not the global-shape copies that
    # DTensor's shape propagation makes in the fake mode.
    assert 0 <= two.peak_breakdown["Optstate"] - two.optimizer_bytes < 1024
    # The frozen ViT is not sharded (every rank holds it whole, in bf16); the rest is halved.
    vit = build_meta_model(load_hf_config(shape_dir), tms_token_id=0).model.visual
    replicated = 2 * sum(p.numel() for p in vit.parameters())
    assert two.parameter_bytes * 2 == one.parameter_bytes + replicated


def test_communication_formula_equals_the_collectives_of_a_step(plans):
    for key in [("lora", 2), ("full", 2)]:
        p = plans[key]
        assert p.comm.all_gather_bytes == p.step.traced.all_gather_bytes > 0
        assert p.comm.reduce_scatter_bytes == p.step.traced.reduce_scatter_bytes > 0
    hsdp = plans[("full", 4)]
    assert hsdp.comm.all_gather_bytes == hsdp.step.traced.all_gather_bytes
    assert hsdp.comm.reduce_scatter_bytes == hsdp.step.traced.reduce_scatter_bytes
    # The gradient shards all-reduced across the two replicas, besides the step's scalar all-reduces.
    assert 0 < hsdp.step.traced.all_reduce_bytes - hsdp.comm.all_reduce_bytes <= 64
    assert hsdp.comm.inter_node_received == hsdp.comm.all_reduce_bytes  # 2·(2−1)/2 of it
    one_rank = plans[("full", 1)].comm
    assert one_rank.all_gather_bytes == one_rank.reduce_scatter_bytes == 0


def test_a_trained_vit_runs_on_fake_tensors(shape_dir, tmp_path):
    """A trained ViT runs in every step (sharded, block by block); it packs its input by the values of the
    image-grid tensor, which the planner's fake tensors keep."""
    cfg = tiny_config(shape_dir, tmp_path, "train.mode=full", "full.train_visual=true")
    p = plan.make_plan(cfg, 2, 8, plan.GPUS["h100"])
    vit_units = [u for u in p.step.units if u.name.startswith("model.visual")]
    assert vit_units and all(u.in_forward and u.in_backward and u.trainable for u in vit_units)
    assert p.comm.all_gather_bytes == p.step.traced.all_gather_bytes


def test_verdict_flips_when_the_gpu_is_too_small(plans):
    p = plans[("lora", 1)]
    peak_gb = p.step.peak_bytes / 1e9
    roomy = dataclasses.replace(p, gpu=dataclasses.replace(p.gpu, memory_gb=peak_gb * 1.01))
    cramped = dataclasses.replace(p, gpu=dataclasses.replace(p.gpu, memory_gb=peak_gb * 0.99))
    assert roomy.fits and not cramped.fits
    assert "DOES NOT FIT" in plan.report(cramped) and "FITS" in plan.report(roomy)


def test_step_time_bound_is_the_largest_resource_time(plans):
    p = plans[("full", 2)]
    bounds = p.bounds()
    assert bounds["compute"] == p.step.flops / (p.gpu.bf16_tflops * 1e12)
    assert bounds["communication"] == pytest.approx(
        (p.comm.all_gather_bytes + p.comm.reduce_scatter_bytes) / 2 / (p.gpu.intra_node_gb_s * 1e9))
    assert f"{max(bounds.values()):.3f} s" in plan.report(p)


def test_command_line_exit_status_says_whether_it_fits(monkeypatch, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("[train]\nmode = \"lora\"\n")
    args = ["--config", str(config), "--shape", "tiny", *(f"--set={o}" for o in SMALL)]
    monkeypatch.setitem(plan.GPUS, "tiny-gpu", plan.GPU("a 1 MB GPU", 1.0, 1.0, 0.001, 1.0, 1.0))
    assert plan.main([*args, "--gpu", "tiny-gpu"]) == plan.DOES_NOT_FIT_STATUS
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_command_line_help_and_a_bad_gpu(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        plan.main(["--help"])
    assert exit_.value.code == 0 and "--gpus" in capsys.readouterr().out
    assert plan.main(["--config", str(tmp_path / "missing.toml"), "--gpu", "v100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --gpu 'v100'") and err.count("\n") == 1
