"""The trainer: model, optimizer and data wired into the training loop (``run``); ``hidream_ft.train`` is
its command line."""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from hidream_ft.config import Config, ConfigError, DiffusionConfig, to_toml
from hidream_ft.data import build_pipeline
from hidream_ft.data.collate import TrainBatch, TrainCollator
from hidream_ft.data.folders import resolved_folder
from hidream_ft.data.heldout import HeldoutBatches
from hidream_ft.data.shards import expand_shards, local_shard_path
from hidream_ft.flow.objective import diffusion_loss, model_timestep
from hidream_ft.inference.heldout import heldout_loss, heldout_scalars
from hidream_ft.inference.validation import log_validation, render_validation
from hidream_ft.metrics import MetricsLogger, peak_memory_gib, require_wandb
from hidream_ft.model.layout import SpecialTokens
from hidream_ft.errors import UserError
from hidream_ft.model.dtypes import TORCH_DTYPES
from hidream_ft.model.loading import load_hf_config, load_model, load_tokenizer
from hidream_ft.lora.formats import adapter_from_peft_state, write_peft_dir
from hidream_ft.lora.targets import apply_lora, init_lora_weights, lora_target_regex, set_full_trainable
from peft import get_peft_model_state_dict  # after hidream_ft.lora, which imports peft without bitsandbytes
from hidream_ft.model.conditioning import ConditionProcessor
from hidream_ft.optim import build_optimizer, build_scheduler
from hidream_ft.optim.ema import EMA_ADAPTER_DIR, ParamEma
from hidream_ft.runtime.checkpoint import Checkpointer, resolve_resume
from hidream_ft.runtime.lock import OutputLock, lock_output_folder
from hidream_ft.parallel.distributed import DistEnv, build_mesh, init_distributed
from hidream_ft.parallel.fsdp import parallelize
from hidream_ft.perceptual.loss import PerceptualLoss
from hidream_ft.preservation import preservation_loss, preservation_prompts
from hidream_ft.runtime.preemption import PreemptionHandler


# The prediction is only read by the loss, never modified in place, so FSDP's view warning does not apply.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


class TrainingAborted(UserError):
    """The run diverged: too many optimizer steps in a row were skipped for a non-finite loss or gradient."""


@dataclass
class StepReading:
    """One step's values on the host: global mean loss, gradient norm, and the ``sums`` it was given."""

    step: int
    loss: float
    grad_norm: float
    sums: list[float]


class HostCopy:
    """A device tensor copied into pinned host memory without waiting for the device; :meth:`values` then
    waits for that copy alone. CPU tensors are already on the host."""

    def __init__(self, tensor: torch.Tensor):
        self.done = None
        self.host = tensor.detach()
        if tensor.is_cuda:
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()

    def values(self) -> list[float]:
        if self.done is not None:
            self.done.synchronize()
        return self.host.numpy().tolist()  # a host buffer: no device read


def master_dtype(cfg: Config) -> torch.dtype:
    """A full fine-tune: bf16 weights with the 8-bit optimizer (its stochastic rounding keeps updates below
    bf16's resolution), fp32 master weights with torch AdamW. LoRA: a bf16 frozen base under fp32 adapters."""
    if cfg.model.dtype == "auto":
        full_fp32 = cfg.train.mode == "full" and cfg.optim.name != "adamw8bit"
        return torch.float32 if full_fp32 else torch.bfloat16
    return TORCH_DTYPES[cfg.model.dtype]


def frozen_dtype(cfg: Config) -> torch.dtype:
    """What the frozen parts of a full fine-tune (ViT, embedding table) are stored in: they need no master copy,
    so the compute dtype (bf16 by default) unless ``model.dtype`` names a dtype for every weight."""
    return TORCH_DTYPES[cfg.parallel.param_dtype] if cfg.model.dtype == "auto" else TORCH_DTYPES[cfg.model.dtype]


def check_base_quantization(cfg: Config) -> None:
    """A quantized base is frozen and computes in bf16: only LoRA can train on it."""
    if cfg.model.base_quantization == "none":
        return
    if cfg.train.mode != "lora":
        raise ConfigError(f"model.base_quantization = {cfg.model.base_quantization!r} needs train.mode = 'lora' "
                          "(quantized weights cannot be trained); use 'none' for a full fine-tune")
    if cfg.parallel.param_dtype != "bfloat16":
        raise ConfigError(f"model.base_quantization = {cfg.model.base_quantization!r} computes in bf16: "
                          "set parallel.param_dtype = 'bfloat16'")
    if cfg.model.base_quantization == "nf4" and cfg.lora.kind in ("loha", "lokr"):
        raise ConfigError(f"lora.kind = {cfg.lora.kind!r} cannot wrap the packed 4-bit linears of "
                          "model.base_quantization = 'nf4': use lora.kind 'lora' or 'dora', or base_quantization 'fp8'")


def build_model(cfg: Config, env: DistEnv, tokenizer, load=load_model):
    """Meta model → LoRA injection or trainable selection → FSDP → materialise → load weights shard-wise
    (with a quantized base: materialise → load → quantize → LoRA injection → FSDP of all but the quantized
    linears). The LM head, unused by image generation, is not built unless a full fine-tune trains it.

    ``load`` has :func:`hidream_ft.model.load_model`'s signature (the benchmark passes a random-weight one).
    Returns (the module to call — the PEFT wrapper in LoRA mode —, the HiDreamO1 inside it: FSDP-sharded on
    several ranks, plain in one process).
    """
    check_base_quantization(cfg)
    mesh = build_mesh(env, cfg.parallel.hsdp, replicate=cfg.parallel.frozen_base == "replicated")

    def prepare(base):
        if cfg.train.mode == "lora":
            model = apply_lora(base, cfg.lora)
        else:
            set_full_trainable(base, cfg.full, frozen_dtype(cfg))
            model = base
        parallelize(base, cfg.parallel, mesh)
        return model

    model = load(cfg.model.path, weights=cfg.model.weights or None, dtype=master_dtype(cfg), device=env.device,
                 attention=cfg.model.attention, tokenizer=tokenizer, prepare=prepare,
                 lm_head=cfg.train.mode == "full" and cfg.full.train_lm_head,
                 base_quantization=cfg.model.base_quantization)
    if cfg.train.mode == "lora":
        init_lora_weights(model, cfg.train.seed)
        return model, model.base_model.model
    return model, model


def compute_loss(model, batch: TrainBatch, diffusion: DiffusionConfig) -> torch.Tensor:
    """One micro-batch: draw σ and ε, noise the target, predict x0, MSE on the target tokens."""
    return compute_loss_and_terms(model, batch, diffusion)[0]


def compute_loss_and_terms(model, batch: TrainBatch, diffusion: DiffusionConfig,
                           perceptual: PerceptualLoss | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`compute_loss` plus the weighted perceptual terms on the predicted images when ``perceptual`` is
    given; also those terms unweighted, by name (for logging)."""
    x0 = batch.x0
    counts = batch.packed_target_counts
    z, sigmas, output = batch.noised(diffusion)
    # Only the target is noised and predicted; reference patches (edit / IP) ride along clean.
    x_pred = model(**batch.model_inputs(z), timestep=model_timestep(sigmas), **output)
    loss = diffusion_loss(x_pred, x0, sigmas, kind=diffusion.loss, sigma_floor=diffusion.velocity_sigma_floor,
                          token_weights=batch.token_weights, sample_weights=batch.weights, token_counts=counts)
    if perceptual is None:
        return loss, {}
    terms = perceptual.terms(x_pred, x0, sigmas, batch.layout.target_grids, counts, batch.weights,
                             batch.token_weights)
    return loss + perceptual.weighted(terms), terms


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, load=load_model, lock: OutputLock | None = None):
        """``lock``: the output folder's (rank 0 of a run holds it), checked before every checkpoint write."""
        self.cfg, self.env = cfg, env
        self.output_dir = Path(cfg.logging.output_dir)
        self.tokenizer = load_tokenizer(cfg.model.path)
        self.tokens = SpecialTokens.from_tokenizer(self.tokenizer, load_hf_config(cfg.model.path))
        self.model, self.base = build_model(cfg, env, self.tokenizer, load)
        # Frozen and small: every rank holds them whole, outside FSDP (docs/quality.md).
        self.perceptual = PerceptualLoss.from_config(cfg.perceptual, env.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)
        self.ema = ParamEma.of_trainable(self.model, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.enabled else None
        self.checkpointer = Checkpointer(self.output_dir / "checkpoints", cfg.checkpoint.keep_last, env.rank,
                                         env.world_size, trainable_only=cfg.train.mode == "lora", lock=lock)
        # Device counters, read on the host only with the step's other values (see ``step``).
        self._skipped_total = torch.zeros((), dtype=torch.int64, device=env.device)
        self._skipped_in_a_row = torch.zeros((), dtype=torch.int64, device=env.device)
        self.step_index = 0
        self._unread: tuple[int, HostCopy] | None = None
        # An unread step's values wait one step only where reading them at once would wait for the device.
        self.lag_reads = env.device.type == "cuda"
        self.readings: list[StepReading] = []

    @property
    def skipped_total(self) -> int:
        """Optimizer steps skipped for a non-finite loss or gradient (waits for the device)."""
        return int(self._skipped_total)

    @property
    def skipped_in_a_row(self) -> int:
        return int(self._skipped_in_a_row)

    def step(self, micro_batches: list[TrainBatch], *, read: bool = True,
             sums: Callable[[], Sequence[float]] = tuple) -> dict:
        """Forward/backward over the micro-batches, then one optimizer step that the device itself skips when
        the global loss or gradient norm is not finite (``optimizer.found_inf``, as torch's GradScaler sets it).

        ``sums``: gives numbers to sum across ranks in the step's loss all-reduce (the preemption votes); it is
        called just before that all-reduce, so a signal caught during the forward and backward counts here.
        With ``read``, the host waits for this step and gets floats back ({"loss", "grad_norm", "lr", "sums"}),
        and a diverged run raises :class:`TrainingAborted` here. Without it nothing waits for the device: the
        values stay on it ("loss", "grad_norm" are device tensors) while a copy travels to host memory. Where
        the device runs ahead of the host (:attr:`lag_reads`, CUDA) they are read one step later, by the next
        call (or :meth:`flush`); elsewhere they are on the host already and are read at once. Every step's
        values arrive exactly once, in order, in :attr:`readings` (the caller drains it).
        """
        self.model.train()
        device = self.env.device
        loss_sum = torch.zeros((), device=device)
        preservation = self.cfg.preservation
        preserving = preservation.enabled and self.step_index % preservation.every == 0
        term_sums: dict[str, torch.Tensor] = {}  # each term unweighted, logged on its own
        for index, batch in enumerate(micro_batches):
            if isinstance(self.base, FSDPModule):
                self.base.set_requires_gradient_sync(index == len(micro_batches) - 1)
            batch = batch.to(device)
            loss, terms = compute_loss_and_terms(self.model, batch, self.cfg.diffusion, self.perceptual)
            if preserving:  # included in the logged loss
                terms["preservation"] = preservation_loss(self.model, batch, self.cfg.diffusion)
                loss = loss + preservation.weight * terms["preservation"]
            for name, value in terms.items():
                term_sums[name] = term_sums.get(name, 0) + value.detach()
            if self.cfg.optim.fused_backward:  # the update runs in backward (one micro-batch, no clipping)
                self.optimizer.begin_backward(loss)
            (loss / len(micro_batches)).backward()
            loss_sum += loss.detach()
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        summed = torch.stack([loss_sum, *term_sums.values(),
                              *(torch.full((), float(value), device=device) for value in sums())])
        dist.all_reduce(summed)
        loss = summed[0] / (len(micro_batches) * self.env.world_size)
        term_means = summed[1:1 + len(term_sums)] / (len(micro_batches) * self.env.world_size)
        votes = summed[1 + len(term_sums):]
        # Both numbers are global (all-reduced), so every rank skips the same steps.
        skip = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.optimizer.found_inf = skip.float()
        self.optimizer.step()
        self._skipped_total += skip
        self._skipped_in_a_row = (self._skipped_in_a_row + 1) * skip
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step_index += 1
        if self.ema is not None and self.step_index % self.cfg.ema.every == 0:
            self.ema.update(skip)
        values = torch.stack([loss, grad_norm.to(loss.dtype), self._skipped_in_a_row.to(loss.dtype), *votes])
        self.flush()
        if read:
            reading = self._take(self.step_index, [value.item() for value in values.cpu()])
            # The host has waited for this step already: reading the terms waits for nothing more.
            return {"loss": reading.loss, "grad_norm": reading.grad_norm, "lr": lr, "sums": reading.sums,
                    "terms": dict(zip(term_sums, term_means.tolist()))}
        self._unread = (self.step_index, HostCopy(values))
        if not self.lag_reads:
            self.flush()
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "terms": dict(zip(term_sums, term_means))}

    def flush(self) -> None:
        """Read the values of the step that was left unread (waiting for that step only)."""
        if self._unread is not None:
            index, copy = self._unread
            self._unread = None
            self._take(index, copy.values())

    def discard_unread(self) -> None:
        """Forget the unread step's values without reading them (the planner's fake tensors hold none)."""
        self._unread = None

    def _take(self, index: int, values: list[float]) -> StepReading:
        loss, grad_norm, in_a_row, *sums = values
        reading = StepReading(index, loss, grad_norm, sums)
        self.readings.append(reading)
        if in_a_row > self.cfg.train.max_consecutive_skips:
            raise TrainingAborted(
                f"{int(in_a_row)} consecutive steps with a non-finite loss or gradient "
                f"(last loss {loss}, grad-norm {grad_norm}); lower optim.lr or check the data"
            )
        return reading

    def meta(self) -> dict:
        lora = self.cfg.lora
        return {
            "mode": self.cfg.train.mode,
            "model_path": str(self.cfg.model.path),
            "skipped_steps": self.skipped_total,
            "lora": {"kind": lora.kind, "rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
                     "use_rslora": lora.use_rslora, "lokr_factor": lora.lokr_factor,
                     "lokr_decompose_both": lora.lokr_decompose_both,
                     "target_modules": self.model.peft_config["default"].target_modules}
            if self.cfg.train.mode == "lora" else None,
        }

    def save_checkpoint(self, step: int, data_state) -> Path:
        return self.checkpointer.save(step, self.model, self.optimizer, self.scheduler, data_state, self.meta(),
                                      self.ema)

    def resume(self) -> tuple[int, object]:
        path = resolve_resume(self.cfg.checkpoint.resume, self.checkpointer.root)
        if path is None:
            return 0, None
        step, data_state = self.checkpointer.load(path, self.model, self.optimizer, self.scheduler, self.ema)
        self.step_index = step
        return step, data_state

    def validation_weights(self):
        """A context in which the model holds the weights validation renders with: the EMA's with
        ``ema.for_validation``, else its own."""
        return self.ema.swapped_in() if self.ema is not None and self.cfg.ema.for_validation else nullcontext()

    def save_adapter(self) -> Path | None:
        """The final LoRA as a PEFT directory (keys in the official HF layout), written atomically; with an EMA,
        its average beside it in ``adapter-ema/``."""
        if self.cfg.train.mode != "lora":
            return None
        out = self._write_adapter("adapter")
        if self.ema is not None:
            with self.ema.swapped_in():
                self._write_adapter(EMA_ADAPTER_DIR)
        return out

    def _write_adapter(self, name: str) -> Path:
        full = get_model_state_dict(self.model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        out = self.output_dir / name
        if self.env.is_main:
            config = self.model.peft_config["default"]
            config.base_model_name_or_path = str(self.cfg.model.path)
            state = get_peft_model_state_dict(self.model, state_dict=full)
            write_peft_dir(adapter_from_peft_state(state, config.to_dict(), str(out)), out, config)
        dist.barrier()
        return out


def check_inputs(cfg: Config) -> None:
    """Stop before the model loads (minutes for the 8B weights) if a path the run reads does not exist or the
    LoRA targets name no known module."""
    load_hf_config(cfg.model.path)
    check_base_quantization(cfg)
    require_wandb(cfg.logging)
    if cfg.train.mode == "lora":
        lora_target_regex(cfg.lora)
    preservation_prompts(cfg.preservation)
    if cfg.model.weights and not Path(cfg.model.weights).is_file():
        raise ConfigError(f"model.weights: {cfg.model.weights!r} is not a file")
    perceptual = cfg.perceptual
    if perceptual.dino_weight > 0 and not Path(perceptual.dino_path).is_dir():
        raise ConfigError(f"perceptual.dino_path: {perceptual.dino_path!r} is not a folder (a transformers DINO "
                          "model saved with save_pretrained)")
    if perceptual.lpips_weight > 0 and not Path(perceptual.lpips_path).is_file():
        raise ConfigError(f"perceptual.lpips_path: {perceptual.lpips_path!r} is not a file")
    for where, folders in (("data.folders", cfg.data.folders),
                           ("data.regularization.folders", cfg.data.regularization.folders),
                           ("validation.loss_folders", cfg.validation.loss_folders)):
        for i, folder in enumerate(folders):
            for path in [folder.path, *folder.controls]:
                resolved_folder(path, f"{where}[{i}]")
    for key, patterns in (("data.shards", cfg.data.shards), ("validation.loss_shards", cfg.validation.loss_shards)):
        for url in expand_shards(patterns):
            local = local_shard_path(url)
            if local is not None and not local.is_file():
                raise ConfigError(f"{key}: {url!r} is not a file")


def finish_complete_run(trainer: Trainer, step: int) -> dict:
    """The newest checkpoint already reached ``train.max_steps``: nothing to train. The adapter is written
    again from it, since a run that died between its final checkpoint and the adapter left none, or an older one."""
    adapter = trainer.save_adapter()
    if trainer.env.is_main:
        written = f"; adapter written to {adapter}" if adapter else ""
        print(f"the run is already complete at step {step} (train.max_steps = {trainer.cfg.train.max_steps}); "
              f"nothing to train{written}", file=sys.stderr)
    return {"history": {}, "skipped": trainer.skipped_total, "step": step}


def drain_readings(trainer: Trainer, preemption: PreemptionHandler, history: dict[int, float]) -> bool:
    """Take the step values that reached the host into ``history`` and the preemption decision; whether the
    ranks agreed to stop."""
    for reading in trainer.readings:
        history[reading.step] = reading.loss
        preemption.agree(reading.sums)
    trainer.readings.clear()
    return preemption.stop_agreed


def step_scalars(stats: dict, trainer: Trainer, pipeline, micro_batches: list[TrainBatch], elapsed: float) -> dict:
    """A logging step's scalars: the step's values (read on the host), throughput, memory and data counters."""
    device, world_size = trainer.env.device, trainer.env.world_size
    samples = sum(b.size for b in micro_batches) * world_size
    tokens = sum(b.target_tokens for b in micro_batches) * world_size
    return {
        "train/loss": stats["loss"], "train/lr": stats["lr"], "train/grad_norm": stats["grad_norm"],
        "train/skipped_steps": trainer.skipped_total, "perf/samples_per_s": samples / elapsed,
        "perf/tokens_per_s": tokens / elapsed, "perf/step_s": elapsed, "memory/peak_gib": peak_memory_gib(device),
        **{f"train/{name}_loss": value for name, value in stats["terms"].items()},
        **{f"data/{k}": v for k, v in pipeline.total_stats(device).items()},
    }


def evaluate_when_due(trainer: Trainer, heldout: HeldoutBatches | None, step: int, log: MetricsLogger) -> None:
    """Validation images and the held-out loss at the steps they are due. Every rank runs them (FSDP forwards are
    collective) and gets the same result; the logger writes on rank 0 only."""
    validation, device = trainer.cfg.validation, trainer.env.device
    if validation.every and step % validation.every == 0:
        with trainer.validation_weights():
            images = render_validation(trainer.model, trainer.tokenizer, trainer.tokens, validation, device)
        log_validation(log, step, images)
    if heldout is not None and step % validation.loss_every == 0:
        log.scalars(step, heldout_scalars(heldout_loss(
            trainer.model, heldout, validation.loss_sigmas, seed=validation.loss_seed,
            noise_scale=trainer.cfg.diffusion.noise_scale, device=device)))


def run(cfg: Config) -> dict:
    env = init_distributed()
    # Installed before the model so a signal during loading is honoured at the first step boundary.
    preemption = PreemptionHandler(env.device).install()
    # Taken before the model loads (minutes at full size), so that a second job on the folder fails at once.
    lock = lock_output_folder(cfg.logging.output_dir, env.rank)
    try:
        return train_locked(cfg, env, preemption, lock)
    finally:
        if lock is not None:
            lock.release()


def train_locked(cfg: Config, env: DistEnv, preemption: PreemptionHandler, lock: OutputLock | None) -> dict:
    """The run, with the output folder's lock held (by rank 0)."""
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, env, lock=lock)
    output_dir = trainer.output_dir
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.toml").write_text(to_toml(cfg))
    start_step, data_state = trainer.resume()
    if start_step >= cfg.train.max_steps:
        preemption.uninstall()
        return finish_complete_run(trainer, start_step)
    processor = ConditionProcessor.from_pretrained(cfg.model.path)
    collate = TrainCollator(trainer.tokenizer, trainer.tokens, cfg.data.max_text_tokens, processor,
                            preservation_prompts(cfg.preservation))
    pipeline = build_pipeline(cfg.data, rank=env.rank, world_size=env.world_size, seed=cfg.train.seed,
                              default_batch_size=cfg.train.batch_size, collate=collate)
    if data_state is not None:
        pipeline.load_state_dict(data_state)
    # Held-out batches need no preservation layouts: the held-out loss is the diffusion loss alone.
    heldout = HeldoutBatches(cfg.data, cfg.validation, TrainCollator(
        trainer.tokenizer, trainer.tokens, cfg.data.max_text_tokens, processor)) if cfg.validation.loss_every else None
    log = MetricsLogger(output_dir, env.is_main, cfg.logging, cfg.train.max_steps, start_step)
    if start_step:
        log.info(f"resumed at step {start_step}")
    history = {}
    step = start_step
    last_saved = start_step
    tick = time.perf_counter()
    last_loss = math.nan
    for step, micro_batches in pipeline.iterate(start_step=start_step, grad_accum=cfg.train.grad_accum):
        done = step + 1
        logging = done % cfg.logging.log_every == 0 or done == cfg.train.max_steps
        checkpointing = bool(cfg.checkpoint.every) and done % cfg.checkpoint.every == 0
        # On CUDA other steps are not waited for: their values (and the preemption votes summed in the step's
        # all-reduce) reach the host one step later, and every rank still stops at the same step.
        stats = trainer.step(micro_batches, read=logging or checkpointing, sums=preemption.votes)
        stop = drain_readings(trainer, preemption, history)
        last_loss = history.get(done, history.get(done - 1, last_loss))  # the newest loss on the host
        elapsed, tick = time.perf_counter() - tick, time.perf_counter()
        log.progress(done, last_loss, stats["lr"])
        if logging:
            log.scalars(done, step_scalars(stats, trainer, pipeline, micro_batches, elapsed))
        evaluate_when_due(trainer, heldout, done, log)
        if checkpointing:
            trainer.save_checkpoint(done, pipeline.state_dict())
            last_saved = done
        step = done
        if stop:
            if last_saved != done:
                trainer.save_checkpoint(done, pipeline.state_dict())
            log.close()
            log.info(f"stopped at step {done} by a preemption signal; checkpoint saved")
            preemption.requeue_exit()
        # Stop before the pipeline draws another batch, so that the data position saved below is the one
        # after the last trained step.
        if done == cfg.train.max_steps:
            break
    trainer.flush()
    drain_readings(trainer, preemption, history)
    preemption.uninstall()
    if step > last_saved:
        trainer.save_checkpoint(step, pipeline.state_dict())
    trainer.save_adapter()
    log.close()
    log.info(f"finished at step {step}; outputs in {output_dir}")
    return {"history": history, "skipped": trainer.skipped_total, "step": step}
