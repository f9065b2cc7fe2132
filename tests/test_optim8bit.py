"""8-bit AdamW on local shards: learning, lossless state round trips, stochastic rounding, DCP resharding,
and the training benchmark's CPU smoke run."""

import copy

import pytest
import torch

from helpers import WORKERS, run_python, set_flags
from hidream_ft import bench
from hidream_ft.config import ConfigError, load_config
from hidream_ft.optim.adamw8bit import (
    ShardedAdamW8bit, dequantize_blockwise, quantization_map, quantize_blockwise, stochastic_round_to_bf16,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def regression_problem(device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=g)
    y = torch.tanh(x @ torch.randn(64, 96, generator=g))
    return x.to(device), y.to(device)


def small_mlp(device):
    """Two 8-bit weights (64·128, 128·96 ≥ 4096 elements) and two fp32-state biases."""
    torch.manual_seed(2)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 96)).to(device)


def train(model, optimizer, x, y, steps):
    losses = []
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("device", DEVICES)
def test_reduces_a_loss_like_adamw(device):
    x, y = regression_problem(device)
    reference_model, model = small_mlp(device), small_mlp(device)
    reference = train(reference_model, torch.optim.AdamW(reference_model.parameters(), lr=3e-3, weight_decay=0.01),
                      x, y, 150)
    eight_bit = ShardedAdamW8bit(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses = train(model, eight_bit, x, y, 150)
    assert eight_bit.is_8bit(model[0].weight) and not eight_bit.is_8bit(model[0].bias)
    assert losses[-1] < 0.25 * losses[0]
    assert losses[-1] == pytest.approx(reference[-1], rel=0.15)


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trip_gives_a_bit_identical_next_step(device):
    x, y = regression_problem(device)
    model = small_mlp(device)
    optimizer = ShardedAdamW8bit(model.parameters(), lr=3e-3, weight_decay=0.01)
    train(model, optimizer, x, y, 5)
    saved = optimizer.state_dict()
    assert saved["state"][0]["exp_avg"].dtype == torch.float32 and saved["state"][0]["exp_avg"].device.type == "cpu"
    twin = copy.deepcopy(model)
    restored = ShardedAdamW8bit(twin.parameters(), lr=1.0)  # the saved hyperparameters win, as in torch
    restored.load_state_dict(saved)
    assert restored.param_groups[0]["lr"] == 3e-3
    for original, copied in zip(model.parameters(), twin.parameters()):
        for a, b in zip(optimizer.moments(original), restored.moments(copied)):
            assert torch.equal(a, b)
    train(model, optimizer, x, y, 1)
    train(twin, restored, x, y, 1)
    for original, copied in zip(model.parameters(), twin.parameters()):
        assert torch.equal(original, copied)


@pytest.mark.parametrize("device", DEVICES)
def test_requantising_kernel_state_is_lossless_with_the_same_blocks(device):
    """After real kernel steps many blocks have a negative maximum (the signed map's end is −0.993, not −1),
    where naive requantisation shifts the scale; the reconstruction must still be exact."""
    param = torch.nn.Parameter(torch.randn(160, 250, device=device))
    optimizer = ShardedAdamW8bit([param], lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for scale in (1.0, 1e-3, 1e2):
        param.grad = (torch.randn(160, 250, generator=g) * torch.rand(160, 250, generator=g) ** 6 * scale).to(device)
        optimizer.step()
    assert optimizer.is_8bit(param)
    state = optimizer.state[param]
    signed = quantization_map(True, param.device)
    values = dequantize_blockwise(state["exp_avg_codes"], state["exp_avg_absmax"], signed)
    per_block = torch.nn.functional.pad(values.flatten(), (0, -values.numel() % 256)).view(-1, 256)
    assert (per_block.min(1).values.abs() > per_block.max(1).values).sum() > 10
    for name, is_signed in (("exp_avg", True), ("exp_avg_sq", False)):
        qmap = quantization_map(is_signed, param.device)
        values = dequantize_blockwise(state[f"{name}_codes"], state[f"{name}_absmax"], qmap)
        codes, absmax = quantize_blockwise(values, qmap)
        assert torch.equal(dequantize_blockwise(codes, absmax, qmap), values)
        assert torch.equal(absmax, state[f"{name}_absmax"])


def test_requantising_with_other_blocks_costs_at_most_half_a_code_step():
    qmap = quantization_map(True, torch.device("cpu"))
    values = torch.randn(10_000, generator=torch.Generator().manual_seed(4))
    quantized = dequantize_blockwise(*quantize_blockwise(values, qmap), qmap)
    shifted = quantized[100:]  # another sharding: block boundaries move by 100 elements
    codes, absmax = quantize_blockwise(shifted, qmap)
    error = (dequantize_blockwise(codes, absmax, qmap) - shifted).abs()
    largest_half_gap = (qmap.diff().max() / 2).item()
    assert (error <= largest_half_gap * absmax.repeat_interleave(256)[: shifted.numel()] + 1e-12).all()
    assert error.max() > 0  # not lossless in general


def test_loads_a_torch_adamw_state_dict():
    x, y = regression_problem("cpu")
    model = small_mlp("cpu")
    adamw = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train(model, adamw, x, y, 3)
    optimizer = ShardedAdamW8bit(model.parameters(), lr=3e-3)
    optimizer.load_state_dict(adamw.state_dict())
    weight = model[0].weight
    exp_avg, exp_avg_sq = optimizer.moments(weight)
    assert optimizer.state[weight]["step"] == 3
    reference = adamw.state[weight]
    assert torch.allclose(exp_avg, reference["exp_avg"], atol=0.01 * reference["exp_avg"].abs().max().item())
    assert torch.allclose(exp_avg_sq, reference["exp_avg_sq"], atol=0.01 * reference["exp_avg_sq"].max().item())


def test_load_rejects_a_state_for_other_parameters():
    optimizer = ShardedAdamW8bit(small_mlp("cpu").parameters())
    other = ShardedAdamW8bit([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="does not match the parameters"):
        optimizer.load_state_dict(other.state_dict())


def test_stochastic_rounding_is_unbiased():
    value = 1.0 + 2**-9  # a quarter of the way from 1.0 to the next bf16 (1 + 2⁻⁷)
    rounded = stochastic_round_to_bf16(torch.full((200_000,), value), torch.Generator().manual_seed(0))
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert rounded.float().mean().item() == pytest.approx(value, abs=2e-5)
    negative = stochastic_round_to_bf16(torch.full((200_000,), -value), torch.Generator().manual_seed(1))
    assert negative.float().mean().item() == pytest.approx(-value, abs=2e-5)
    exact = torch.tensor([0.0, -2.5, 3.0, float("inf")])
    assert torch.equal(stochastic_round_to_bf16(exact, torch.Generator()).float(), exact)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(64, 128), (8192,)], ids=["8bit-state", "fp32-state"])
def test_stochastic_rounding_keeps_updates_that_bf16_rounding_loses(device, shape):
    """A constant gradient makes every Adam update exactly lr = 1e-4, a fortieth of bf16's step below 1.0."""
    steps, lr = 100, 1e-4
    results = {}
    for rounding in (False, True):
        param = torch.nn.Parameter(torch.ones(shape, dtype=torch.bfloat16, device=device))
        optimizer = ShardedAdamW8bit([param], lr=lr, stochastic_rounding=rounding)
        for _ in range(steps):
            param.grad = torch.ones_like(param)
            optimizer.step()
        results[rounding] = param.float().mean().item()
    assert results[False] == 1.0  # every update rounded away
    assert results[True] == pytest.approx(1.0 - steps * lr, abs=1e-3)


def test_stochastic_rounding_needs_adamw8bit():
    with pytest.raises(ConfigError, match="stochastic_rounding"):
        load_config(None, ["optim.stochastic_rounding=true", "optim.name=adamw"])
    assert load_config(None, ["optim.stochastic_rounding=true", "optim.name=adamw8bit"]).optim.stochastic_rounding


def test_benchmark_runs_the_trainer_step_at_tiny_shape(capsys):
    args = bench.parse_args(["--shape", "tiny", "--mode", "full", "--optim", "adamw8bit", "--size", "64",
                             "--batch", "2", "--steps", "2", "--warmup", "1"])
    row = bench.run(args)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:9] == ["tiny", "full", "64²", "2 × 1", "none", "no", "adamw8bit", "split", "132"]
    assert float(cells[9]) > 0 and cells[13] == "n/a"
    assert row in capsys.readouterr().out


def test_mfu_convention_matches_the_reference_formula():
    flops = bench.model_flops_per_token(6_950_000_000, 36, 4096, 1152)
    assert flops == 6 * 6.95e9 + 12 * 36 * 4096 * 1152
    assert bench.mfu(1.0, 1152, flops, 989e12) == pytest.approx(flops * 1152 / 989e12)


def launch(nproc, tiny_checkpoint, run_dir, out, steps, *flags) -> dict:
    options = set_flags("train.mode=full", "optim.name=adamw8bit", "train.max_steps=10")
    run_python(WORKERS / "adamw8bit_moments.py", tiny_checkpoint, run_dir, out, steps, *flags, *options, nproc=nproc)
    return torch.load(out, weights_only=False)


def assert_same_moments(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for name, (exp_avg, exp_avg_sq, step) in expected.items():
        got_avg, got_sq, got_step = actual[name]
        assert got_step == step, name
        assert torch.equal(got_avg, exp_avg) and torch.equal(got_sq, exp_avg_sq), name


@pytest.mark.distributed
def test_fsdp_training_and_dcp_checkpoints_reshard_1_to_2_to_1_ranks(tiny_checkpoint, tmp_path):
    run = tmp_path / "run"
    one = launch(1, tiny_checkpoint, run, tmp_path / "one.pt", 3, "--save")
    losses = list(one["losses"].values())
    assert losses[-1] < losses[0]
    assert len(one["eight_bit"]) >= 10 and len(one["final"]) > len(one["eight_bit"])  # both storage kinds
    two = launch(2, tiny_checkpoint, run, tmp_path / "two.pt", 4, "--resume", "--save")
    assert_same_moments(one["final"], two["resumed"])
    assert list(two["losses"]) == [4] and two["losses"][4] < losses[-1]
    back = launch(1, tiny_checkpoint, run, tmp_path / "back.pt", 4, "--resume")
    assert_same_moments(two["final"], back["resumed"])
