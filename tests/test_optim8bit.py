"""The fused 8-bit AdamW: learning, agreement with bitsandbytes, state round trips, stochastic rounding, the
skip flag, op counts, the Triton kernel (interpreted), DCP resharding, and the training benchmark's CPU smoke
run."""

import copy
import io
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import WORKERS, make_trainer, noise_samples, run_python, set_flags
from hidream_ft import bench
from hidream_ft.config import ConfigError, load_config
from hidream_ft.data.collate import TextToImageCollator
from hidream_ft.optim.adamw8bit import (
    MOMENTS, ShardedAdamW8bit, dequantize_blockwise, quantization_map, quantize_blockwise, rounding_key,
    rounding_noise, stochastic_round_to_bf16,
)
from hidream_ft.parallel.distributed import shutdown
from hidream_ft.trainer import master_dtype

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
    weight_state = saved["state"][0]
    assert weight_state["exp_avg_codes"].dtype == torch.uint8 and weight_state["exp_avg_codes"].shape == (128, 64)
    assert weight_state["exp_avg_scales"].shape == (128, 1) and saved["state"][1]["exp_avg"].shape == (128,)
    assert float(weight_state["step"]) == 5
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


def test_quantization_map_is_bitsandbytes_dynamic_map():
    functional = pytest.importorskip("bitsandbytes.functional")
    for signed in (True, False):
        assert torch.equal(quantization_map(signed), functional.create_dynamic_map(signed=signed))


def test_blockwise_quantization_runs_along_rows_and_keeps_half_a_code_step():
    qmap = quantization_map(True)
    values = torch.randn(6, 300, generator=torch.Generator().manual_seed(4))
    values[2] *= 1e-4  # a row of its own scale: blocks never mix rows
    codes, scales = quantize_blockwise(values, qmap)
    assert codes.shape == (6, 300) and codes.dtype == torch.uint8 and scales.shape == (6, 2)
    assert torch.equal(scales[:, 0], values[:, :256].abs().amax(1))
    assert torch.equal(scales[:, 1], values[:, 256:].abs().amax(1))
    restored = dequantize_blockwise(codes, scales, qmap)
    half_gap = (qmap.diff().max() / 2).item()
    per_element_scale = torch.cat([scales[:, :1].expand(6, 256), scales[:, 1:].expand(6, 44)], dim=1)
    assert ((restored - values).abs() <= half_gap * per_element_scale * (1 + 1e-4)).all()  # −1 → −0.993
    assert (restored - values).abs().max() > 0


def test_fused_update_follows_bitsandbytes_adamw8bit():
    """Rows of 512 make this layout's blocks the same elements as bitsandbytes' flat blocks of 256, so the two
    updates differ only where a value lands near the middle between two codes: far less than either differs
    from exact (fp32-state) AdamW."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(5)
    ours = torch.nn.Parameter(torch.randn(64, 512))
    theirs, exact = (torch.nn.Parameter(ours.detach().clone()) for _ in range(2))
    optimizer = ShardedAdamW8bit([ours], lr=1e-2, weight_decay=0.1)
    reference = bnb.optim.AdamW8bit([theirs], lr=1e-2, weight_decay=0.1)
    adamw = torch.optim.AdamW([exact], lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(6)
    for _ in range(5):
        ours.grad = torch.randn(64, 512, generator=g)
        theirs.grad, exact.grad = ours.grad.clone(), ours.grad.clone()
        for stepper in (optimizer, reference, adamw):
            stepper.step()
    quantization_error = (theirs - exact).abs()
    assert quantization_error.mean() > 1e-4  # five steps of ≈ lr = 1e-2: 8-bit moments show
    assert (ours - theirs).abs().mean() < 0.05 * quantization_error.mean()
    assert (ours - exact).abs().max() < 2 * quantization_error.max()
    state = reference.state[theirs]
    qmap = quantization_map(True)
    exp_avg = state["state1"].float()
    ours_exp_avg = optimizer.moments(ours)[0]
    assert ours_exp_avg.shape == exp_avg.shape
    bnb_exp_avg = qmap[state["state1"].long()].view(-1, 256) * state["absmax1"][:, None]
    assert torch.allclose(ours_exp_avg.view(-1, 256), bnb_exp_avg, atol=0.02 * bnb_exp_avg.abs().max().item())


def test_loads_a_torch_adamw_state_dict():
    x, y = regression_problem("cpu")
    model = small_mlp("cpu")
    adamw = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train(model, adamw, x, y, 3)
    optimizer = ShardedAdamW8bit(model.parameters(), lr=3e-3)
    optimizer.load_state_dict(adamw.state_dict())
    weight = model[0].weight
    exp_avg, exp_avg_sq = optimizer.moments(weight)
    assert float(optimizer.step_count) == 3
    reference = adamw.state[weight]
    assert torch.allclose(exp_avg, reference["exp_avg"], atol=0.01 * reference["exp_avg"].abs().max().item())
    assert torch.allclose(exp_avg_sq, reference["exp_avg_sq"], atol=0.01 * reference["exp_avg_sq"].max().item())


def test_load_rejects_a_state_for_other_parameters():
    optimizer = ShardedAdamW8bit(small_mlp("cpu").parameters())
    other = ShardedAdamW8bit([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="does not match the parameters"):
        optimizer.load_state_dict(other.state_dict())


def noise_bits(seed: int, step: float, param_index: int, count: int, first_element: int = 0) -> torch.Tensor:
    key = rounding_key(seed, torch.tensor(step))
    elements = first_element + torch.arange(count)
    return rounding_noise(key, torch.full((count,), param_index), elements)


def test_stochastic_rounding_is_unbiased_and_keyed_by_seed_step_and_element():
    value = 1.0 + 2**-9  # a quarter of the way from 1.0 to the next bf16 (1 + 2⁻⁷)
    noise = noise_bits(0, 1.0, 0, 200_000)
    assert 0 <= noise.min() and noise.max() < 2**16 and noise.float().mean().item() == pytest.approx(2**15, rel=0.01)
    rounded = stochastic_round_to_bf16(torch.full((200_000,), value), noise)
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert rounded.float().mean().item() == pytest.approx(value, abs=2e-5)
    negative = stochastic_round_to_bf16(torch.full((200_000,), -value), noise_bits(0, 2.0, 0, 200_000))
    assert negative.float().mean().item() == pytest.approx(-value, abs=2e-5)
    exact = torch.tensor([0.0, -2.5, 3.0, float("inf")])
    assert torch.equal(stochastic_round_to_bf16(exact, noise_bits(0, 1.0, 0, 4)).float(), exact)
    assert torch.equal(noise, noise_bits(0, 1.0, 0, 200_000))  # a pure function: resumes need no RNG state
    # A shard starting at element 1000 draws what the whole tensor draws there: noise does not depend on sharding.
    assert torch.equal(noise[1000:1100], noise_bits(0, 1.0, 0, 100, first_element=1000))
    for other in (noise_bits(1, 1.0, 0, 200_000), noise_bits(0, 2.0, 0, 200_000), noise_bits(0, 1.0, 1, 200_000)):
        assert (other != noise).float().mean() > 0.99


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_found_inf_makes_the_step_a_no_op(dtype):
    x, y = regression_problem("cpu")
    model = small_mlp("cpu").to(dtype)
    optimizer = ShardedAdamW8bit(model.parameters(), lr=3e-3, weight_decay=0.1)
    train(model, optimizer, x.to(dtype), y.to(dtype), 2)
    before = copy.deepcopy((list(model.parameters()), dict(optimizer.state), optimizer.step_count))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.found_inf = torch.tensor(1.0)
    optimizer.step()
    params, state, step_count = before
    assert torch.equal(optimizer.step_count, step_count) and float(step_count) == 2
    for old, new in zip(params, model.parameters()):
        assert torch.equal(old, new)
        assert all(torch.equal(state[old][key], optimizer.state[new][key]) for key in state[old])
    optimizer.found_inf = torch.tensor(0.0)
    optimizer.step()
    assert float(optimizer.step_count) == 3
    assert not torch.equal(params[0], model[0].weight)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert func is not torch.ops.aten._local_scalar_dense.default, "the step read a device value on the host"
        self.count += 1
        return func(*args, **(kwargs or {}))


def aten_ops_of_a_step(num_matrices: int, dtype: torch.dtype, found_inf: torch.Tensor | None = None) -> int:
    """aten ops of one step (after the first, which creates the state) over ``num_matrices`` 8-bit matrices
    (rows of 300: padded blocks) and as many fp32-state vectors (docs/benchmarks.md, "8-bit optimizer step")."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16, 300, generator=g).to(dtype)) for _ in range(num_matrices)]
    params += [torch.nn.Parameter(torch.randn(16, generator=g).to(dtype)) for _ in range(num_matrices)]
    optimizer = ShardedAdamW8bit(params, lr=1e-3, min_8bit_size=256)
    optimizer.found_inf = found_inf
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
    optimizer.step()
    with CountOps() as ops:
        optimizer.step()
    return ops.count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-stochastic-rounding"])
def test_step_op_count_does_not_grow_with_the_number_of_parameters(dtype):
    few, many = aten_ops_of_a_step(10, dtype, torch.tensor(0.0)), aten_ops_of_a_step(100, dtype, torch.tensor(0.0))
    assert few == many < 300  # the per-parameter loop it replaced dispatched ~21 ops per parameter


KERNEL_CHECK = """
import copy, torch
from hidream_ft.optim.adamw8bit import ShardedAdamW8bit
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    torch_path = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in [(3, 300), (2, 256), (100,)]]
    kernel_path = copy.deepcopy(torch_path)
    a = ShardedAdamW8bit(torch_path, lr=1e-2, weight_decay=0.1, min_8bit_size=256, seed=3)
    b = ShardedAdamW8bit(kernel_path, lr=1e-2, weight_decay=0.1, min_8bit_size=256, seed=3)
    b._on_kernel = lambda device: True  # the interpreter runs the kernel on CPU tensors
    for skip in (0.0, 0.0, 1.0):
        for x, y in zip(torch_path, kernel_path):
            x.grad = torch.randn_like(x)
            y.grad = x.grad.clone()
        a.found_inf, b.found_inf = torch.tensor(skip), torch.tensor(skip)
        a.step()
        b.step()
    for x, y in zip(torch_path, kernel_path):
        assert torch.equal(x, y), (dtype, x.shape)
        assert all(torch.equal(a.state[x][k], b.state[y][k]) for k in a.state[x]), (dtype, x.shape)
print("kernel == torch")
"""


def test_triton_kernel_equals_the_torch_implementation_in_the_interpreter():
    """Triton's interpreter runs the CUDA kernel's code on CPU tensors, one program per block: the kernel's
    math (padding, quantisation, stochastic rounding, the skip flag) must match the CPU path bit for bit."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kernel == torch" in result.stdout


def test_stochastic_rounding_defaults_on_and_fused_backward_needs_its_conditions():
    cfg = load_config(None, ["optim.name=adamw8bit", "train.mode=full"])
    assert cfg.optim.stochastic_rounding and master_dtype(cfg) == torch.bfloat16
    assert master_dtype(load_config(None, ["train.mode=full"])) == torch.float32
    assert master_dtype(load_config(None, ["train.mode=full", "optim.name=adamw8bit",
                                           "model.dtype=float32"])) == torch.float32
    with pytest.raises(ConfigError, match="grad_clip"):
        load_config(None, ["optim.name=adamw8bit", "optim.fused_backward=true"])
    with pytest.raises(ConfigError, match="grad_accum"):
        load_config(None, ["optim.name=adamw8bit", "optim.fused_backward=true", "optim.grad_clip=0",
                           "train.grad_accum=2"])
    with pytest.raises(ConfigError, match="fused_backward"):
        load_config(None, ["optim.fused_backward=true", "optim.grad_clip=0"])
    assert load_config(None, ["optim.name=adamw8bit", "optim.fused_backward=true",
                              "optim.grad_clip=0"]).optim.fused_backward


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


EIGHT_BIT_FULL = ("train.mode=full", "optim.name=adamw8bit", "optim.grad_clip=0")


def tiny_batch(trainer):
    return TextToImageCollator(trainer.tokenizer, trainer.tokens, 128)(noise_samples()[:2])


def trained_params(trainer) -> dict[str, torch.Tensor]:
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in trainer.model.named_parameters() if p.requires_grad}


def test_optimizer_in_backward_gives_the_parameters_of_the_normal_step(tiny_checkpoint, tmp_path):
    results = {}
    for fused in (False, True):
        torch.manual_seed(0)
        trainer = make_trainer(tiny_checkpoint, tmp_path / str(fused), *EIGHT_BIT_FULL,
                               f"optim.fused_backward={str(fused).lower()}")
        batch = tiny_batch(trainer)
        initial = trained_params(trainer)
        for _ in range(3):
            stats = trainer.step([batch])
            if fused:  # the hooks freed every gradient during backward: no norm to log
                assert all(p.grad is None for p in trainer.params) and stats["grad_norm"] == 0
        results[fused] = trained_params(trainer)
        assert float(trainer.optimizer.step_count) == 3
        shutdown()
    assert results[False].keys() == results[True].keys()
    for name, value in results[False].items():
        assert torch.equal(results[True][name], value), name
    assert any(not torch.equal(initial[name], value) for name, value in results[False].items())


def pickled(tensor: torch.Tensor) -> bytes:
    stream = io.BytesIO()
    torch.save(tensor, stream)
    return stream.getvalue()


def test_optimizer_checkpoint_is_the_size_of_the_8bit_state_and_reads_fp32_moments(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path / "run", *EIGHT_BIT_FULL)
    batch = tiny_batch(trainer)
    trainer.step([batch])
    optimizer = trainer.optimizer
    in_memory = sum(t.nbytes for state in optimizer.state.values() for t in state.values())
    assert sum(optimizer.is_8bit(p) for p in trainer.params) >= 10
    _, optim_state = get_state_dict(trainer.model, optimizer)
    dcp.save({"optim": optim_state}, checkpoint_id=tmp_path / "optim")
    on_disk = sum(f.stat().st_size for f in (tmp_path / "optim").iterdir())
    # DCP frames each tensor with torch.save (≈1.5 kB whatever its size): at the tiny model's 200-odd small
    # tensors that framing is a third of the bytes, at the 8B model's megabyte-sized ones nothing.
    framing = len(pickled(torch.empty(0)))
    tensors = sum(len(state) for state in optim_state["state"].values())
    assert in_memory <= on_disk - tensors * framing <= 1.1 * in_memory
    # A checkpoint with fp32 moments (torch AdamW's layout, as earlier versions wrote it) still loads.
    path = trainer.save_checkpoint(1, {"position": 1})
    model_state, optim_state = get_state_dict(trainer.model, optimizer)
    for state in optim_state["state"].values():
        for name, signed in MOMENTS:
            codes = state.pop(f"{name}_codes", None)
            if codes is not None:
                scales = state.pop(f"{name}_scales")
                if isinstance(codes, DTensor):
                    values = dequantize_blockwise(codes.to_local(), scales.to_local(), quantization_map(signed))
                    state[name] = DTensor.from_local(values, codes.device_mesh, codes.placements)
                else:
                    state[name] = dequantize_blockwise(codes, scales, quantization_map(signed))
    expected = {p: optimizer.moments(p) for p in trainer.params}
    shutil.rmtree(path / "optim", ignore_errors=True)
    for old in path.glob("*.distcp"):
        old.unlink()
    (path / ".metadata").unlink()
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    twin = make_trainer(tiny_checkpoint, tmp_path / "twin", *EIGHT_BIT_FULL)
    assert twin.checkpointer.load(path, twin.model, twin.optimizer, twin.scheduler)[0] == 1
    for param, twin_param in zip(trainer.params, twin.params):
        # Requantised: within a code step of the block's scale (a block whose largest magnitude is negative
        # gets a scale 0.7 % smaller, the signed map ending at −0.993).
        for a, b in zip(expected[param], twin.optimizer.moments(twin_param)):
            assert torch.allclose(a, b, rtol=0, atol=0.015 * a.abs().max().item())
        assert "exp_avg_codes" in twin.optimizer.state[twin_param] or not twin.optimizer.is_8bit(twin_param)
    assert float(twin.optimizer.step_count) == 1


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
