"""The trainer: model, optimizer and data wired into the training loop (``run``); ``hidream_ft.train`` is
its command line."""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from hidream_ft.config import Config, ConfigError, DiffusionConfig, to_toml
from hidream_ft.data import build_pipeline
from hidream_ft.data.collate import TrainBatch, TrainCollator
from hidream_ft.data.folders import resolved_folder
from hidream_ft.data.shards import expand_shards, local_shard_path
from hidream_ft.flow.objective import add_noise, diffusion_loss, draw_sigmas_and_noise, model_timestep
from hidream_ft.inference.validation import log_validation, render_validation
from hidream_ft.metrics import MetricsLogger, peak_memory_gib
from hidream_ft.model.layout import SpecialTokens
from hidream_ft.errors import UserError
from hidream_ft.model.dtypes import TORCH_DTYPES
from hidream_ft.model.loading import load_hf_config, load_model, load_tokenizer
from hidream_ft.lora.formats import adapter_from_peft_state, write_peft_dir
from hidream_ft.lora.targets import apply_lora, init_lora_weights, lora_target_regex, set_full_trainable
from peft import get_peft_model_state_dict  # after hidream_ft.lora, which imports peft without bitsandbytes
from hidream_ft.model.conditioning import ConditionProcessor
from hidream_ft.optim import build_optimizer, build_scheduler
from hidream_ft.runtime.checkpoint import Checkpointer, resolve_resume
from hidream_ft.runtime.lock import OutputLock, lock_output_folder
from hidream_ft.parallel.distributed import DistEnv, build_mesh, init_distributed
from hidream_ft.parallel.fsdp import parallelize
from hidream_ft.runtime.preemption import PreemptionHandler


# The prediction is only read by the loss, never modified in place, so FSDP's view warning does not apply.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


class TrainingAborted(UserError):
    """The run diverged: too many optimizer steps in a row were skipped for a non-finite loss or gradient."""


def master_dtype(cfg: Config) -> torch.dtype:
    """fp32 master weights for a full fine-tune; a bf16 frozen base under fp32 adapters for LoRA."""
    if cfg.model.dtype == "auto":
        return torch.float32 if cfg.train.mode == "full" else torch.bfloat16
    return TORCH_DTYPES[cfg.model.dtype]


def build_model(cfg: Config, env: DistEnv, tokenizer, load=load_model):
    """Meta model → LoRA injection or trainable selection → FSDP → materialise → load weights shard-wise.

    ``load`` has :func:`hidream_ft.model.load_model`'s signature (the benchmark passes a random-weight one).
    Returns (the module to call — the PEFT wrapper in LoRA mode —, the FSDP-sharded HiDreamO1 inside it).
    """
    mesh = build_mesh(env, cfg.parallel.hsdp)

    def prepare(base):
        if cfg.train.mode == "lora":
            model = apply_lora(base, cfg.lora)
        else:
            set_full_trainable(base, cfg.full)
            model = base
        parallelize(base, cfg.parallel, mesh)
        return model

    model = load(cfg.model.path, weights=cfg.model.weights or None, dtype=master_dtype(cfg), device=env.device,
                 attention=cfg.model.attention, tokenizer=tokenizer, prepare=prepare)
    if cfg.train.mode == "lora":
        init_lora_weights(model, cfg.train.seed)
        return model, model.base_model.model
    return model, model


def compute_loss(model, batch: TrainBatch, diffusion: DiffusionConfig) -> torch.Tensor:
    """One micro-batch: draw σ and ε, noise the target, predict x0, MSE on the target tokens."""
    x0 = batch.x0
    sigmas, noise = draw_sigmas_and_noise(
        batch.noise_seeds, x0.shape[1:], x0.device, method=diffusion.timestep_sampling,
        logit_mean=diffusion.logit_mean, logit_std=diffusion.logit_std, shift=diffusion.shift,
        sigma_min=diffusion.sigma_min, sigma_max=diffusion.sigma_max,
    )
    z = add_noise(x0, noise, sigmas, diffusion.noise_scale)
    # Only the target is noised and predicted; reference patches (edit / IP) ride along clean.
    x_pred = model(**batch.model_inputs(z), timestep=model_timestep(sigmas),
                   output_tokens=batch.layout.num_target_tokens)
    return diffusion_loss(x_pred, x0, sigmas, kind=diffusion.loss, sigma_floor=diffusion.velocity_sigma_floor,
                          sample_weights=batch.weights)


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, load=load_model, lock: OutputLock | None = None):
        """``lock``: the output folder's (rank 0 of a run holds it), checked before every checkpoint write."""
        self.cfg, self.env = cfg, env
        self.output_dir = Path(cfg.logging.output_dir)
        self.tokenizer = load_tokenizer(cfg.model.path)
        self.tokens = SpecialTokens.from_tokenizer(self.tokenizer, load_hf_config(cfg.model.path))
        self.model, self.base = build_model(cfg, env, self.tokenizer, load)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)
        self.checkpointer = Checkpointer(self.output_dir / "checkpoints", cfg.checkpoint.keep_last, env.rank,
                                         env.world_size, trainable_only=cfg.train.mode == "lora", lock=lock)
        self.skipped_total = 0
        self.skipped_in_a_row = 0

    def step(self, micro_batches: list[TrainBatch]) -> dict[str, float]:
        """Forward/backward over the micro-batches, then one guarded optimizer step."""
        self.model.train()
        loss_sum = torch.zeros((), device=self.env.device)
        for index, batch in enumerate(micro_batches):
            self.base.set_requires_gradient_sync(index == len(micro_batches) - 1)
            loss = compute_loss(self.model, batch.to(self.env.device), self.cfg.diffusion)
            (loss / len(micro_batches)).backward()
            loss_sum += loss.detach()
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        dist.all_reduce(loss_sum)
        loss = loss_sum.item() / (len(micro_batches) * self.env.world_size)
        grad_norm = grad_norm.item()
        # Both numbers are global (all-reduced), so every rank takes the same branch.
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.skipped_in_a_row = 0
        else:
            self.skipped_total += 1
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row > self.cfg.train.max_consecutive_skips:
                raise TrainingAborted(
                    f"{self.skipped_in_a_row} consecutive steps with a non-finite loss or gradient "
                    f"(last loss {loss}, grad-norm {grad_norm}); lower optim.lr or check the data"
                )
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr}

    def meta(self) -> dict:
        lora = self.cfg.lora
        return {
            "mode": self.cfg.train.mode,
            "model_path": str(self.cfg.model.path),
            "skipped_steps": self.skipped_total,
            "lora": {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
                     "use_rslora": lora.use_rslora, "target_modules": self.model.peft_config["default"].target_modules}
            if self.cfg.train.mode == "lora" else None,
        }

    def save_checkpoint(self, step: int, data_state) -> Path:
        return self.checkpointer.save(step, self.model, self.optimizer, self.scheduler, data_state, self.meta())

    def resume(self) -> tuple[int, object]:
        path = resolve_resume(self.cfg.checkpoint.resume, self.checkpointer.root)
        if path is None:
            return 0, None
        step, data_state = self.checkpointer.load(path, self.model, self.optimizer, self.scheduler)
        return step, data_state

    def save_adapter(self) -> Path | None:
        """The final LoRA as a PEFT directory (keys in the official HF layout), written atomically."""
        if self.cfg.train.mode != "lora":
            return None
        full = get_model_state_dict(self.model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        out = self.output_dir / "adapter"
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
    if cfg.train.mode == "lora":
        lora_target_regex(cfg.lora)
    if cfg.model.weights and not Path(cfg.model.weights).is_file():
        raise ConfigError(f"model.weights: {cfg.model.weights!r} is not a file")
    for i, folder in enumerate(cfg.data.folders):
        for path in [folder.path, *folder.controls]:
            resolved_folder(path, f"data.folders[{i}]")
    for url in expand_shards(cfg.data.shards):
        local = local_shard_path(url)
        if local is not None and not local.is_file():
            raise ConfigError(f"data.shards: {url!r} is not a file")


def finish_complete_run(trainer: Trainer, step: int) -> dict:
    """The newest checkpoint already reached ``train.max_steps``: nothing to train. The adapter is written
    again from it, since a run that died between its final checkpoint and the adapter left none, or an older one."""
    adapter = trainer.save_adapter()
    if trainer.env.is_main:
        written = f"; adapter written to {adapter}" if adapter else ""
        print(f"the run is already complete at step {step} (train.max_steps = {trainer.cfg.train.max_steps}); "
              f"nothing to train{written}", file=sys.stderr)
    return {"history": {}, "skipped": trainer.skipped_total, "step": step}


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
    collate = TrainCollator(trainer.tokenizer, trainer.tokens, cfg.data.max_text_tokens,
                            ConditionProcessor.from_pretrained(cfg.model.path))
    pipeline = build_pipeline(cfg.data, rank=env.rank, world_size=env.world_size, seed=cfg.train.seed,
                              default_batch_size=cfg.train.batch_size, collate=collate)
    if data_state is not None:
        pipeline.load_state_dict(data_state)
    log = MetricsLogger(output_dir, env.is_main, cfg.logging.tensorboard, cfg.train.max_steps, start_step)
    if start_step:
        log.info(f"resumed at step {start_step}")
    history = {}
    step = start_step
    last_saved = start_step
    tick = time.perf_counter()
    for step, micro_batches in pipeline.iterate(start_step=start_step, grad_accum=cfg.train.grad_accum):
        stats = trainer.step(micro_batches)
        done = step + 1
        history[done] = stats["loss"]
        elapsed, tick = time.perf_counter() - tick, time.perf_counter()
        samples = sum(b.size for b in micro_batches) * env.world_size
        tokens = samples * micro_batches[0].layout.num_target_tokens
        log.progress(done, stats["loss"], stats["lr"])
        if done % cfg.logging.log_every == 0 or done == cfg.train.max_steps:
            log.scalars(done, {
                "train/loss": stats["loss"], "train/lr": stats["lr"], "train/grad_norm": stats["grad_norm"],
                "train/skipped_steps": trainer.skipped_total, "perf/samples_per_s": samples / elapsed,
                "perf/tokens_per_s": tokens / elapsed, "perf/step_s": elapsed,
                "memory/peak_gib": peak_memory_gib(env.device),
                **{f"data/{k}": v for k, v in pipeline.total_stats(env.device).items()},
            })
        if cfg.validation.every and done % cfg.validation.every == 0:
            # Every rank renders (FSDP forwards are collective); rank 0 writes the images.
            images = render_validation(trainer.model, trainer.tokenizer, trainer.tokens, cfg.validation, env.device)
            if log.writer is not None:
                log_validation(log.writer, done, images)
        if cfg.checkpoint.every and done % cfg.checkpoint.every == 0:
            trainer.save_checkpoint(done, pipeline.state_dict())
            last_saved = done
        step = done
        if preemption.should_stop():  # a collective: every rank asks every step and all stop together
            if last_saved != done:
                trainer.save_checkpoint(done, pipeline.state_dict())
            log.close()
            log.info(f"stopped at step {done} by a preemption signal; checkpoint saved")
            preemption.requeue_exit()
        # Stop before the pipeline draws another batch, so that the data position saved below is the one
        # after the last trained step.
        if done == cfg.train.max_steps:
            break
    preemption.uninstall()
    if step > last_saved:
        trainer.save_checkpoint(step, pipeline.state_dict())
    trainer.save_adapter()
    log.close()
    log.info(f"finished at step {step}; outputs in {output_dir}")
    return {"history": history, "skipped": trainer.skipped_total, "step": step}
