"""Shared by the tests and their torchrun workers: tiny training setups, test samples, pipeline draining,
and running Python in child processes."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import Dinov2Config, Dinov2Model

from hidream_ft.config import load_config
from hidream_ft.data import Sample, build_pipeline, list_of_samples
from hidream_ft.model import SpecialTokens, build_t2i_layout, load_hf_config, load_tokenizer
from hidream_ft.parallel.distributed import init_distributed, shutdown
from hidream_ft.perceptual.lpips import LPIPS
from hidream_ft.trainer import Trainer, run

TESTS = Path(__file__).resolve().parent
WORKERS = TESTS / "workers"
CAPTIONS = ("a red circle", "a green square on a blue background", "a yellow triangle", "the lazy dog")
# Set in this process by in-process tests (a one-rank group); a child must start its own group.
DIST_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# -- training ------------------------------------------------------------------------------------------


def tiny_overrides(checkpoint: Path, output_dir: Path) -> list[str]:
    """Config overrides that train the tiny checkpoint in fp32, writing into ``output_dir``."""
    return [f"model.path='{checkpoint}'", "model.dtype='float32'", "parallel.param_dtype='float32'",
            f"logging.output_dir='{output_dir}'"]


def make_trainer(checkpoint: Path, output_dir: Path, *overrides: str) -> Trainer:
    """A trainer of the tiny checkpoint at lr 3e-3 (``overrides`` come last and win): a one-rank group in a test
    process, every rank under torchrun."""
    cfg = load_config(None, [*tiny_overrides(checkpoint, output_dir), "optim.lr=3e-3", *overrides])
    return Trainer(cfg, init_distributed())


def train_tiny(checkpoint: Path, output_dir: Path, steps: int, *overrides: str) -> dict:
    """``hidream_ft.trainer.run`` in this process (a one-rank group) on the tiny checkpoint for ``steps`` steps:
    fp32, the dense reference attention, a checkpoint every 2 steps, every step logged, data read in this
    process; ``overrides`` give the data and the rest."""
    cfg = load_config(None, [
        *tiny_overrides(checkpoint, output_dir), "logging.log_every=1", f"train.max_steps={steps}",
        "checkpoint.every=2", "model.attention='dense'", "data.num_workers=0", "data.max_text_tokens=48", *overrides,
    ])
    try:
        return run(cfg)
    finally:
        shutdown()


def write_config(tmp_path: Path, text: str = "") -> Path:
    """``tmp_path/train.toml``: output into ``tmp_path/runs``, then ``text``."""
    config = tmp_path / "train.toml"
    config.write_text(f'[logging]\noutput_dir = "{tmp_path / "runs"}"\n{text}')
    return config


def write_tiny_dino(path: Path) -> Path:
    """A tiny random DINOv2 saved like a transformers download; wide initial weights make its embeddings tell
    images apart clearly."""
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=8, image_size=32, initializer_range=0.5)
    Dinov2Model(config).save_pretrained(path)
    return path


def write_lpips_weights(path: Path, net: str = "alex", seed: int = 0) -> Path:
    """Random weights in the lpips package's state-dict layout, with its input-scaling buffers too."""
    torch.manual_seed(seed)
    state = {key: value.abs() if key.startswith("lin") else value for key, value in LPIPS(net).state_dict().items()}
    state["scaling_layer.shift"] = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
    state["scaling_layer.scale"] = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def training_worker_arguments() -> argparse.ArgumentParser:
    """The command line the torchrun workers in tests/workers/ that train share: CHECKPOINT RUN_DIR OUT STEPS
    [--resume] [--set KEY=VALUE]...; a worker adds its own flags."""
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--set", action="append", default=[])
    return parser


def tensorboard_scalars(output_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of a run's scalar ``tag``, over all its event files (a resumed run adds one)."""
    values = {}
    for events in sorted((output_dir / "tensorboard").glob("events.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return values


# -- samples -------------------------------------------------------------------------------------------


def noise_samples(captions=CAPTIONS, seed: int = 0, first_noise_seed: int = 0) -> list[Sample]:
    """64×64 text-to-image samples with uniform-noise pixels; sample i is keyed ``s{i}`` and has noise seed
    ``first_noise_seed + i``."""
    g = torch.Generator().manual_seed(seed)
    return [Sample(torch.rand(3, 64, 64, generator=g) * 2 - 1, caption, f"s{i}", noise_seed=first_noise_seed + i)
            for i, caption in enumerate(captions)]


def quantized_pixels(height: int, width: int, seed: int) -> torch.Tensor:
    """Random pixels as an 8-bit image decodes to: [3, H, W] in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), generator=g).float() / 127.5 - 1.0


def forward_inputs(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Keyword arguments of one HiDreamO1 forward of the checkpoint: a 64×96 text-to-image layout, random
    target patches and a timestep."""
    tokenizer = load_tokenizer(checkpoint)
    tokens = SpecialTokens.from_tokenizer(tokenizer, load_hf_config(checkpoint))
    layout = build_t2i_layout(tokenizer, tokens, "a red circle", height=64, width=96)
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": layout.input_ids[None],
        "position_ids": layout.position_ids[:, None],
        "vinputs": torch.randn(1, layout.num_target_tokens, 3072, generator=generator),
        "timestep": torch.tensor([0.37]),
        "token_types": layout.token_types[None],
    }


def t2i_samples() -> list[Sample]:
    return [Sample(quantized_pixels(64, 64, 0), "a red circle", "t0", noise_seed=0),
            Sample(quantized_pixels(64, 64, 1), "a green square on a blue background", "t1", noise_seed=1)]


def edit_samples(num_references: int = 1) -> list[Sample]:
    """Two 64×64 edit samples, each with ``num_references`` 64×96 reference images."""
    return [Sample(quantized_pixels(64, 64, 10 + i), caption, f"e{i}", task="edit",
                   references=[quantized_pixels(64, 96, 20 + i + 7 * r) for r in range(num_references)],
                   noise_seed=10 + i)
            for i, caption in enumerate(["add a hat", "make it brighter"])]


# -- data pipeline -------------------------------------------------------------------------------------


def drain_pipeline(cfg, steps, start_step=0, grad_accum=1, state=None, rank=0, world_size=1, batch_size=2, seed=7,
                   collate=list_of_samples) -> tuple[list, list, dict]:
    """``steps`` optimizer steps of a new pipeline from ``start_step`` (after loading ``state`` when given):
    the (step, micro-batches) pairs, the pipeline's state after each step, and its counters at the end."""
    pipeline = build_pipeline(cfg, rank=rank, world_size=world_size, seed=seed, default_batch_size=batch_size,
                              collate=collate)
    if state is not None:
        pipeline.load_state_dict(state)
    out, states = [], []
    iterator = pipeline.iterate(start_step=start_step, grad_accum=grad_accum)
    for step, micro_batches in iterator:
        out.append((step, micro_batches))
        states.append(pipeline.state_dict())
        if len(out) == steps:
            break
    iterator.close()
    return out, states, pipeline.stats()


# -- processes -----------------------------------------------------------------------------------------


def pythonpath_with_tests() -> str:
    """PYTHONPATH that lets child processes import this folder's modules (workers, job entry points)."""
    return os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))


def set_flags(*overrides: str) -> list[str]:
    """Command-line form of ``overrides``: ``--set KEY=VALUE`` for each."""
    return [arg for override in overrides for arg in ("--set", override)]


def start_python(*args, nproc: int | None = None, **popen_options) -> subprocess.Popen:
    """Start ``python ARGS``, or with ``nproc`` ``torchrun --nproc_per_node NPROC ARGS``, single-threaded, in a
    session of its own."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc else []
    cmd = [sys.executable, *launcher, *map(str, args)]
    env = {key: value for key, value in os.environ.items() if key not in DIST_VARIABLES}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=pythonpath_with_tests())
    return subprocess.Popen(cmd, env=env, start_new_session=True, **popen_options)


def run_python(*args, nproc: int | None = None, timeout: float = 300, check: bool = True,
               ) -> subprocess.CompletedProcess:
    """:func:`start_python`, output captured, waited for.

    A timeout kills the session before it raises ``subprocess.TimeoutExpired``. With ``check``, a non-zero exit
    raises with the ends of stdout and stderr.
    """
    with start_python(*args, nproc=nproc, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        cmd = process.args
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    if check and process.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)} exited with status {process.returncode}\n"
                             f"--- end of stdout ---\n{stdout[-2000:]}\n--- end of stderr ---\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def wait_for(condition, what: str, timeout: float = 120.0, interval: float = 0.05) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``: a job's tasks and their data-loader workers, as SLURM would signal them."""
    found = []
    for thread in Path(f"/proc/{pid}/task").iterdir():
        for child in map(int, (thread / "children").read_text().split()):
            found += [child, *descendants(child)]
    return found
