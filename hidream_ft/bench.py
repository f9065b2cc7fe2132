"""Training speed and memory of the real trainer step, on the 8B shape with random weights (no checkpoint files).

    python -m hidream_ft.bench --mode lora --size 1024 --batch 1 --steps 10 [--ac none|full|selective|op]
        [--compile] [--optim adamw|adamw8bit] [--attention auto|dense|split|flex] [--shape 8b|tiny]
        [--set KEY=VALUE ...] [--profile DIR] [--counts] [--perceptual none|dino|lpips|both]
    python -m hidream_ft.bench --size 512[,1024 ...] --max-tokens 4608 ...    # one packed row per rank
    torchrun --nproc_per_node 8 -m hidream_ft.bench ...        # sharded; images/s and tokens/s are global

The model is built on the meta device in the Qwen3-VL-8B shape, given LoRA adapters or the full-FT trainable
set, sharded with FSDP2 and materialised on the device exactly as the trainer does it, then filled with random
weights. Each step is ``Trainer.step`` (forward, backward, clipping, optimizer step) on one synthetic batch, so
data loading is not part of the figure; the batch is pinned once and copied to the GPU asynchronously in every
step, as a batch from the data loader is. Steps after ``--warmup`` are timed one by one. Prints a markdown row:

    s/step (median, min, max), images/s, tokens/s (all sequence tokens, text included; from the median),
    peak memory (CUDA: max allocated; CPU: process max RSS), MFU = Σ_i (6·N + 12·L·d·S_i)·S_i / (step time · peak)

with N the decoder parameters without the embedding (6.95e9 at 8B), L layers, d hidden size, S_i the sequence
length of sample i (a packed row's padding counts nowhere) and a peak of 989 TFLOP/s (H100 dense bf16). The convention counts 6·N for LoRA too and ignores activation
recomputation, so it compares recipes, not hardware utilisation. ``--shape tiny`` runs the same path on CPU.
``--perceptual`` adds the perceptual loss terms with random weights of the real networks' shapes (DINOv2-B/14,
LPIPS-AlexNet) at the default 224² resolution; ``--counts`` then also gives their FLOPs and time alone.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import statistics
import sys
import tempfile
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import Dinov2Config, Dinov2Model

from hidream_ft.trainer import Trainer
from hidream_ft.cli import entry_point, int_at_least
from hidream_ft.config import AttentionKind, load_config, toml_literal
from hidream_ft.data.collate import TextToImageCollator, TrainCollator
from hidream_ft.data.paired import sample_tokens
from hidream_ft.data.planner import PackedSamples
from hidream_ft.data.samples import Sample
from hidream_ft.metrics import peak_memory_gib
from hidream_ft.model.attention import resolve_attention
from hidream_ft.model.conditioning import ConditionProcessor
from hidream_ft.model.layout import PackedLayout
from hidream_ft.model.loading import load_model
from hidream_ft.testing.tiny import preprocessor_config, tiny_config_dict, tiny_tokenizer
from hidream_ft.parallel.distributed import init_distributed, shutdown
from hidream_ft.parallel.fsdp import compile_enabled
from hidream_ft.perceptual.lpips import LPIPS

H100_BF16_PEAK_TFLOPS = 989.0

# The Qwen3-VL-8B shape of HiDream-O1-Image; the tiny shape is hidream_ft.testing.tiny's.
SHAPES = {
    "8b": {
        "text_config": {
            "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "rope_theta": 5000000.0,
            "rope_scaling": {"rope_type": "default", "mrope_interleaved": True, "mrope_section": [24, 20, 20]},
        },
        "vision_config": {
            "depth": 27, "hidden_size": 1152, "num_heads": 16, "intermediate_size": 4304, "out_hidden_size": 4096,
            "deepstack_visual_indexes": [8, 16, 24], "num_position_embeddings": 2304,
        },
    },
    "tiny": {"text_config": {}, "vision_config": {}},
}

# facebook/dinov2-base: ViT-B/14.
DINO_BASE_SHAPE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                   "patch_size": 14, "image_size": 518}

CAPTION_WORDS = "a photo of a red circle on a blue background with a yellow triangle over a gradient".split()

HEADER = ("| shape | mode | size | batch × ranks | AC | compile | optim | attention | seq | s/step (median) "
          "| images/s | tokens/s | peak GiB | MFU % | device | s/step min | s/step max |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


@dataclass
class Measurement:
    step_s: float  # median over the timed steps; the rates and the MFU use it
    min_step_s: float
    max_step_s: float
    images_per_s: float
    tokens_per_s: float
    peak_gib: float
    mfu: float | None  # fraction of the peak; None on CPU, where the H100 peak means nothing
    seq_len: int  # of a row: padded to the longest sample, or to --max-tokens when packed
    images: int  # per rank: the batch size, or the samples in the packed row
    graphs_before_timing: int  # dynamo graphs compiled by the end of the warm-up


def model_flops_per_token(decoder_params: int, layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward) plus 12·L·d·S for attention scores."""
    return 6 * decoder_params + 12 * layers * hidden * seq_len


def mean_flops_per_token(decoder_params: int, layers: int, hidden: int, sequence_lengths: list[int]) -> float:
    """Training FLOPs per real token of a batch whose samples have these sequence lengths: each sample's
    attention term uses its own length (a packed sample attends within itself)."""
    flops = sum(model_flops_per_token(decoder_params, layers, hidden, s) * s for s in sequence_lengths)
    return flops / sum(sequence_lengths)


def mfu(step_s: float, tokens_per_step: int, flops_per_token: float, peak_flops: float) -> float:
    return flops_per_token * tokens_per_step / (step_s * peak_flops)


def write_shape_dir(out: Path, shape: str) -> Path:
    """config.json + tokenizer (+ preprocessor config) in the official layout, without weights."""
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(str(out))
    config = tiny_config_dict(tokenizer)
    for section, values in SHAPES[shape].items():
        config[section].update(values)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(), indent=2))
    return out


@torch.no_grad()
def randomize_parameters(model: torch.nn.Module, seed: int) -> None:
    """Init-like random weights, drawn shard by shard on the device: N(0, 0.02) matrices, unit norms, zero biases."""
    generator = None
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        if generator is None:
            generator = torch.Generator(device=local.device).manual_seed(seed)
        if param.dim() >= 2:
            local.normal_(0.0, 0.02, generator=generator)
        elif "norm" in name:
            local.fill_(1.0)
        else:
            local.zero_()


def random_weights_loader(seed: int):
    """``hidream_ft.model.loading.load_model`` with random weights: it reads no weight files."""
    return functools.partial(load_model, fill=lambda model: randomize_parameters(model, seed))


def write_perceptual_nets(out: Path, terms: str) -> list[str]:
    """Random-weight perceptual networks of the real shapes under ``out``; the config overrides that use them."""
    overrides = []
    if terms in ("dino", "both"):
        torch.manual_seed(0)
        Dinov2Model(Dinov2Config(**DINO_BASE_SHAPE)).save_pretrained(out / "dino")
        overrides += [f"perceptual.dino_path={toml_literal(str(out / 'dino'))}", "perceptual.dino_weight=1.0"]
    if terms in ("lpips", "both"):
        # The calibration weights of a real file are non-negative, and loading checks it.
        state = {key: value.abs() if key.startswith("lin") else value for key, value in LPIPS("alex").state_dict().items()}
        torch.save(state, out / "lpips.pth")
        overrides += [f"perceptual.lpips_path={toml_literal(str(out / 'lpips.pth'))}", "perceptual.lpips_weight=1.0"]
    return overrides


def build_trainer(cfg, env) -> Trainer:
    # Only the weight source differs: LoRA, trainable selection, FSDP, optimizer and step are the production code.
    return Trainer(cfg, env, load=random_weights_loader(cfg.train.seed))


def synthetic_batch(trainer: Trainer, size: int, batch: int, text_tokens: int):
    """``batch`` random size×size images whose captions fill the text budget exactly as a long caption would."""
    collate = TextToImageCollator(trainer.tokenizer, trainer.tokens, text_tokens)
    caption, g = long_caption(text_tokens), torch.Generator().manual_seed(0)
    return collate([random_sample(g, size, caption, i) for i in range(batch)])


def long_caption(text_tokens: int) -> str:
    """A caption of ``text_tokens`` words: longer than the prompt budget, which it therefore fills."""
    return " ".join(itertools.islice(itertools.cycle(CAPTION_WORDS), text_tokens))


def random_sample(generator: torch.Generator, size: int, caption: str, index: int) -> Sample:
    return Sample(torch.rand(3, size, size, generator=generator) * 2 - 1, caption, f"bench-{index}",
                  noise_seed=index)


def packed_batch(trainer: Trainer, processor: ConditionProcessor, sizes: list[int], max_tokens: int,
                 text_tokens: int):
    """One packed row of ``max_tokens`` tokens, through the trainer's collator: size×size samples, ``sizes`` in
    turn, as many as fit by the data planner's count (captions filling ``text_tokens``, so the count is exact)."""
    collate = TrainCollator(trainer.tokenizer, trainer.tokens, text_tokens, processor)
    caption, g = long_caption(text_tokens), torch.Generator().manual_seed(0)
    samples, used = [], 0
    for i, size in enumerate(itertools.cycle(sizes)):
        used += sample_tokens((size, size), None, text_tokens)
        if used > max_tokens:
            break
        samples.append(random_sample(g, size, caption, i))
    return collate(PackedSamples(samples, max_tokens))


def sequence_lengths(batch) -> list[int]:
    """Real tokens of each sample: its stretch of a packed row, else the whole row."""
    if isinstance(batch.layout, PackedLayout):
        documents = batch.layout.document_ids
        return torch.bincount(documents[documents >= 0], minlength=batch.size).tolist()
    return [batch.layout.token_types.shape[1]] * batch.size


def decoder_params(trainer: Trainer) -> int:
    """N of the MFU convention: decoder weights without the embedding table and without LoRA adapters."""
    language_model = trainer.base.model.language_model
    return sum(p.numel() for name, p in language_model.named_parameters()
               if "embed_tokens" not in name and "lora_" not in name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Per-step wall times without a host sync inside the timed loop: CUDA events around each step on a GPU
    (read after the last step), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def timed_steps(trainer: Trainer, batch, steps: int) -> list[float]:
    """``steps`` trainer steps as the training loop runs them between log lines (no host read of the loss, one
    step of lag); the seconds of each."""
    timer = StepTimer(trainer.env.device)
    timer.mark()
    for _ in range(steps):
        trainer.step([batch], read=False)
        timer.mark()
    trainer.flush()
    return timer.seconds()


def measure(trainer: Trainer, batch, steps: int, warmup: int, peak_tflops: float,
            profile_dir: Path | None = None) -> Measurement:
    device = trainer.env.device
    for _ in range(warmup):
        trainer.step([batch])
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    graphs_before_timing = counters["stats"]["unique_graphs"]
    if profile_dir is None:
        times = timed_steps(trainer, batch, steps)
    else:
        with profiled(profile_dir, device, trainer.env.rank):
            times = timed_steps(trainer, batch, steps)
    if trainer.skipped_total:
        print(f"warning: {trainer.skipped_total} steps had a non-finite loss or gradient and skipped the "
              "optimizer step; the timing is not representative", file=sys.stderr)
    step_s = statistics.median(times)
    world = trainer.env.world_size
    lengths = sequence_lengths(batch)
    images, tokens = batch.size * world, sum(lengths) * world
    config = trainer.base.config.text_config
    flops = mean_flops_per_token(decoder_params(trainer), config.num_hidden_layers, config.hidden_size, lengths)
    utilisation = mfu(step_s, tokens, flops, peak_tflops * 1e12) if device.type == "cuda" else None
    return Measurement(step_s, min(times), max(times), images / step_s, tokens / step_s, peak_memory_gib(device),
                       utilisation, batch.layout.token_types.shape[1], batch.size, graphs_before_timing)


@contextlib.contextmanager
def profiled(out_dir: Path, device: torch.device, rank: int):
    """A torch profiler over the timed steps, its Chrome trace written to ``out_dir/trace-rank{rank}.json``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        yield
    out_dir.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(out_dir / f"trace-rank{rank}.json"))


# Ops that only reshape, alias or allocate a tensor: no kernel does work for them.
METADATA_OPS = frozenset(f"aten::{name}" for name in (
    "view", "_unsafe_view", "reshape", "as_strided", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze",
    "slice", "select", "split", "split_with_sizes", "chunk", "unbind", "narrow", "alias", "detach", "empty",
    "empty_like", "empty_strided", "lift_fresh", "resolve_conj", "resolve_neg", "_reshape_alias", "view_as"))


class OpCount(TorchDispatchMode):
    """Counts the calls of ``ops`` that run (an op answered from a selective-checkpoint cache does not); with
    no ``ops``, of every op but the reshaping/aliasing ones: the kernel-like ops."""

    def __init__(self, *ops):
        super().__init__()
        self.ops = frozenset(ops)
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.ops if self.ops else func._schema.name not in METADATA_OPS
        return func(*args, **(kwargs or {}))


def host_syncs() -> OpCount:
    """``aten._local_scalar_dense`` is the op behind ``.item()``, ``bool(t)`` and ``float(t)``: on a GPU each
    call waits for the device."""
    return OpCount(torch.ops.aten._local_scalar_dense.default)


def matmuls() -> OpCount:
    aten = torch.ops.aten
    return OpCount(aten.mm.default, aten.addmm.default, aten.bmm.default)


def layer_op_counts(trainer: Trainer, batch) -> dict[str, int]:
    """Ops of one decoder layer's forward and backward: aten ops (every level) from the profiler; from a
    dispatch mode, which sees the ops that reach a kernel (after autograd and decompositions), the kernel-like
    ops and the matmuls run in the forward and in the backward (recomputation included).

    The second layer's inputs are captured during a step and the layer is run again on them alone.
    """
    layer = trainer.base.decoder_layers[1]
    captured = {}

    def capture(module, args, kwargs):
        captured.setdefault("inputs", (args, kwargs))

    handle = layer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        trainer.step([batch])
    finally:
        handle.remove()
    args, kwargs = captured["inputs"]

    def replay(forward_mode=contextlib.nullcontext(), backward_mode=contextlib.nullcontext()):
        with forward_mode:
            out = layer(args[0].detach().requires_grad_(), *args[1:], **kwargs)
        with backward_mode:
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()

    # Separate runs: an active dispatch mode adds profiler events of its own.
    forward, backward, kernels = matmuls(), matmuls(), OpCount()
    with kernels:
        replay(forward, backward)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        replay()
    aten = sum(event.name.startswith("aten::") for event in profiler.events())
    return {"aten ops per layer (fwd+bwd)": aten, "kernel-like ops per layer (fwd+bwd)": kernels.count,
            "matmuls per layer, forward": forward.count, "matmuls per layer, backward": backward.count}


def proxy_counts(trainer: Trainer, batch, graphs_before_timing: int) -> dict[str, int]:
    """Device-independent costs of the step (docs/benchmarks.md, "CPU proxy counts")."""
    syncs = host_syncs()
    with syncs:
        trainer.step([batch], read=False)
    trainer.flush()
    return {
        **layer_op_counts(trainer, batch),
        "host syncs per step": syncs.count,
        "graphs compiled in timed steps": counters["stats"]["unique_graphs"] - graphs_before_timing,
        "graph breaks": sum(counters["graph_break"].values()),
    }


def perceptual_counts(trainer: Trainer, batch, steps: int) -> dict[str, float]:
    """The perceptual terms alone on the batch's images, forward and backward into a stand-in prediction: their
    FLOPs (torch's FLOP counter: convolutions, matmuls, attention) and the median seconds of ``steps`` runs."""
    device = trainer.env.device
    batch = batch.to(device)
    x0 = batch.x0
    prediction = (x0 + 0.1 * torch.randn_like(x0)).requires_grad_(True)
    sigmas = torch.full((batch.size,), 0.5, device=device)

    def terms_forward_backward():
        perceptual = trainer.perceptual
        perceptual.weighted(perceptual.terms(prediction, x0, sigmas, batch.layout.target_grids,
                                             batch.packed_target_counts, batch.weights)).backward()

    flops = FlopCounterMode(display=False)
    with flops:
        terms_forward_backward()
    timer = StepTimer(device)
    timer.mark()
    for _ in range(steps):
        terms_forward_backward()
        timer.mark()
    return {"perceptual GFLOPs per step (fwd+bwd)": round(flops.get_total_flops() / 1e9, 1),
            "perceptual s per step (median)": round(statistics.median(timer.seconds()), 4)}


def table_row(args: argparse.Namespace, world: int, result: Measurement, device: torch.device, compiled: bool) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    mfu_text = "n/a" if result.mfu is None else f"{100 * result.mfu:.1f}"
    batch = f"{result.images} packed × {world}" if args.max_tokens else f"{result.images} × {world}"
    cells = [args.shape, args.mode, ",".join(f"{size}²" for size in args.size), batch, args.ac,
             "yes" if compiled else "no", args.optim,
             resolve_attention(args.attention, device, packed=bool(args.max_tokens)), str(result.seq_len),
             f"{result.step_s:.3f}", f"{result.images_per_s:.2f}", f"{result.tokens_per_s:,.0f}",
             f"{result.peak_gib:.1f}", mfu_text, name, f"{result.min_step_s:.3f}", f"{result.max_step_s:.3f}"]
    return "| " + " | ".join(cells) + " |"


def multiple_of_32(text: str) -> int:
    value = int(text)
    if value <= 0 or value % 32:
        raise argparse.ArgumentTypeError(f"{value} is not a positive multiple of 32")
    return value


def square_sides(text: str) -> list[int]:
    return [multiple_of_32(part) for part in text.split(",")]


positive, non_negative = int_at_least(1), int_at_least(0)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hidream_ft.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["lora", "full"], default="lora")
    parser.add_argument("--size", type=square_sides, default=[1024],
                        help="square image side in pixels; several, comma-separated, with --max-tokens")
    parser.add_argument("--batch", type=positive, default=1, help="images per rank per step")
    parser.add_argument("--max-tokens", type=non_negative, default=0,
                        help="> 0: one packed row of this many tokens per rank instead of --batch images "
                             "(data.max_tokens), holding the --size samples in turn while they fit")
    parser.add_argument("--steps", type=positive, default=10, help="timed steps")
    parser.add_argument("--warmup", type=non_negative, default=2, help="untimed steps first (compilation, state init)")
    parser.add_argument("--ac", choices=["none", "full", "selective", "op"], default="none",
                        help="activation checkpointing (parallel.activation_checkpointing)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each decoder layer also on CPU (parallel.compile; default auto = CUDA)")
    parser.add_argument("--optim", choices=["adamw", "adamw8bit"], default="adamw")
    parser.add_argument("--attention", choices=typing.get_args(AttentionKind), default="auto",
                        help="auto = flex on CUDA, split on CPU; the table names the one that ran")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--text-tokens", type=positive, default=128, help="text part of each sequence")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK_TFLOPS, help="for MFU")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other trainer config key, e.g. --set model.dtype=bfloat16 (repeatable)")
    parser.add_argument("--no-header", action="store_true", help="print the table row only")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="write a torch profiler trace of the timed steps to DIR/trace-rank<r>.json")
    parser.add_argument("--counts", action="store_true",
                        help="also print the CPU proxy counts (ops per layer, host syncs, recompiles, graph breaks)")
    parser.add_argument("--perceptual", choices=["none", "dino", "lpips", "both"], default="none",
                        help="add the perceptual loss terms (random-weight DINOv2-B/14 and LPIPS-AlexNet)")
    args = parser.parse_args(argv)
    if args.max_tokens:
        if args.attention == "split":
            parser.error("--max-tokens: packed rows need --attention flex, dense or auto")
        first = sample_tokens((args.size[0], args.size[0]), None, args.text_tokens)
        if first > args.max_tokens:
            parser.error(f"--max-tokens {args.max_tokens}: one {args.size[0]}² sample takes {first} tokens")
    elif len(args.size) > 1:
        parser.error("several --size values need --max-tokens (one packed row of mixed sizes)")
    return args


def compile_setting(args: argparse.Namespace) -> bool | str:
    return True if args.compile else "auto"


def config_overrides(args: argparse.Namespace, shape_dir: Path, output_dir: Path) -> list[str]:
    return [
        f"model.path={toml_literal(str(shape_dir))}", f"train.mode={args.mode}", f"model.attention={args.attention}",
        f"parallel.activation_checkpointing={args.ac}", f"parallel.compile={toml_literal(compile_setting(args))}",
        f"optim.name={args.optim}", f"train.max_steps={args.warmup + args.steps}",
        f"logging.output_dir={toml_literal(str(output_dir))}", "logging.tensorboard=false", *args.set,
    ]


def run(args: argparse.Namespace) -> str:
    env = init_distributed()
    with tempfile.TemporaryDirectory(prefix="hidream-bench-") as tmp:
        shape_dir = write_shape_dir(Path(tmp), args.shape)
        perceptual = write_perceptual_nets(Path(tmp), args.perceptual) if args.perceptual != "none" else []
        cfg = load_config(None, [*config_overrides(args, shape_dir, Path(tmp) / "run"), *perceptual])
        trainer = build_trainer(cfg, env)
        if args.max_tokens:
            processor = ConditionProcessor.from_pretrained(shape_dir)
            batch = packed_batch(trainer, processor, args.size, args.max_tokens, args.text_tokens)
        else:
            batch = synthetic_batch(trainer, args.size[0], args.batch, args.text_tokens)
        if env.device.type == "cuda":
            batch = batch.pin_memory()  # as the data loader hands it over: each step copies it asynchronously
        result = measure(trainer, batch, args.steps, args.warmup, args.peak_tflops, args.profile)
        counts = proxy_counts(trainer, batch, result.graphs_before_timing) if args.counts else {}
        if args.counts and trainer.perceptual:
            counts.update(perceptual_counts(trainer, batch, args.steps))
    row = table_row(args, env.world_size, result, env.device, compile_enabled(cfg.parallel.compile, env.device.type))
    if env.is_main:
        print(row if args.no_header else f"{HEADER}\n{row}", flush=True)
        for name, value in counts.items():
            print(f"{name}: {value}", flush=True)
    return row


@entry_point
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        run(args)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
