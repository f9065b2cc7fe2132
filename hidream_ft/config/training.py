"""The training configuration: one dataclass per TOML section (``[model]``, ``[train]``, …) and its loader.

Every key is documented in ``docs/config.md``; a test keeps that page and these dataclasses in sync.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hidream_ft.config.cluster import SlurmConfig
from hidream_ft.config.sampling import SamplingSettings
from hidream_ft.config.toml import ConfigError, apply_overrides, build_table, read_toml, write_toml
from hidream_ft.flow.noise import NOISE_SCALE

# Weights dtype of the trainer and the sampler; "auto" lets each pick for its device and mode.
ModelDtype = Literal["auto", "bfloat16", "float32"]
# The hybrid attention's implementation (hidream_ft.model.attention); "auto": flex on CUDA, split elsewhere.
AttentionKind = Literal["auto", "dense", "split", "flex"]


@dataclass
class ModelConfig:
    path: str = ""
    # One .safetensors file with the weights instead of those in `path` (which then needs only its config,
    # tokenizer and processor files): e.g. a ComfyUI single-file checkpoint. Empty: the weights in `path`.
    weights: str = ""
    dtype: ModelDtype = "auto"
    attention: AttentionKind = "auto"
    # LoRA only: the frozen decoder linears stored in NF4 or fp8, computing in bf16 (docs/memory.md).
    base_quantization: Literal["none", "nf4", "fp8"] = "none"


@dataclass
class LoraConfig:
    kind: Literal["lora", "dora", "loha", "lokr"] = "lora"
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    use_rslora: bool = False
    lokr_factor: int = -1  # LoKr: PEFT's decompose_factor (-1: factors near the square root of each dimension)
    lokr_decompose_both: bool = False  # LoKr: also write the first Kronecker factor as a rank-r product
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    train_heads: list[str] = field(default_factory=list)
    include_visual: bool = False

    def validate(self, where: str) -> None:
        if self.kind in ("loha", "lokr"):
            # PEFT's LoHa and LoKr have neither rsLoRA nor dropout on the input.
            for key, value in (("dropout", self.dropout), ("use_rslora", self.use_rslora)):
                if value:
                    raise ConfigError(f"{where}.{key}: applies to kind 'lora' and 'dora' only, got kind {self.kind!r}")
        elif self.lokr_factor != -1 or self.lokr_decompose_both:
            raise ConfigError(f"{where}.lokr_factor / lokr_decompose_both: apply to kind 'lokr' only, "
                              f"got kind {self.kind!r}")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise ConfigError(f"{where}.lokr_factor: -1 or a positive factor, got {self.lokr_factor}")


@dataclass
class FullConfig:
    train_visual: bool = False
    train_lm_head: bool = False
    train_embed_tokens: bool = False


@dataclass
class DiffusionConfig:
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    sigma_min: float = 0.001
    sigma_max: float = 1.0
    noise_scale: float = NOISE_SCALE
    loss: Literal["x0", "velocity"] = "x0"
    velocity_sigma_floor: float = 0.05


@dataclass
class OptimConfig:
    name: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    stochastic_rounding: bool = True  # adamw8bit: round bf16 weight updates stochastically (docs/optimizers.md)
    fused_backward: bool = False  # adamw8bit: update each parameter during backward, freeing its gradient

    def validate(self, where: str) -> None:
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ConfigError(f"{where}.betas: expected two numbers in [0, 1) such as [0.9, 0.999], got {self.betas}")
        if self.fused_backward and self.name != "adamw8bit":
            raise ConfigError(f"{where}.fused_backward: only optim.name = 'adamw8bit' implements it, "
                              f"got optim.name = {self.name!r}")


@dataclass
class TrainConfig:
    mode: Literal["lora", "full"] = "lora"
    max_steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    seed: int = 0
    max_consecutive_skips: int = 10


def check_buckets(buckets: list[list[int]], where: str) -> list[tuple[int, int]]:
    """An explicit ``[[width, height], ...]`` bucket list as tuples; sides must be positive multiples of 32."""
    checked = []
    for i, bucket in enumerate(buckets):
        if len(bucket) != 2 or any(side <= 0 for side in bucket):
            raise ConfigError(f"{where}[{i}]: {bucket} is not a [width, height] pair of positive integers")
        if any(side % 32 for side in bucket):
            nearest = [max(32, round(side / 32) * 32) for side in bucket]
            raise ConfigError(f"{where}[{i}]: bucket {bucket} is not a multiple of 32; try {nearest}")
        checked.append((bucket[0], bucket[1]))
    if len(set(checked)) != len(checked):
        raise ConfigError(f"{where}: the same bucket is listed twice in {buckets}")
    return checked


@dataclass
class FolderSource:
    """One local image folder (``[[data.folders]]`` table; a plain string is shorthand for ``{path = ...}``)."""

    path: str = ""
    num_repeats: int = 1
    # Edit / IP (docs/edit_ip.md): folders holding one control image per target under the same name.
    control_dir: str = ""
    control_dirs: list[str] = field(default_factory=list)
    task: Literal["", "edit", "ip"] = ""  # "": edit for one control folder, ip for several
    # Masked loss (docs/data.md "Loss masks"): a folder of same-name masks; white = learn, black = ignore.
    mask_dir: str = ""

    @property
    def controls(self) -> list[str]:
        return [self.control_dir] if self.control_dir else list(self.control_dirs)

    def validate(self, where: str) -> None:
        if not self.path:
            raise ConfigError(f"{where}.path: a folder path is required")
        if self.num_repeats < 1:
            raise ConfigError(f"{where}.num_repeats: must be at least 1, got {self.num_repeats}")
        if self.control_dir and self.control_dirs:
            raise ConfigError(f"{where}: set either control_dir or control_dirs, not both")
        if self.task and not self.controls:
            raise ConfigError(f"{where}.task: {self.task!r} needs control_dir or control_dirs")


@dataclass
class DataStage:
    """One step of the resolution schedule (``[[data.stages]]``), used until ``until_step`` (exclusive)."""

    until_step: int | None = None
    area: int | None = None
    buckets: list[list[int]] = field(default_factory=list)
    batch_size: int | None = None
    max_tokens: int | None = None  # packed micro-batches of this many tokens instead of batch_size (docs/data.md)

    def validate(self, where: str) -> None:
        if self.until_step is not None and self.until_step < 1:
            raise ConfigError(f"{where}.until_step: must be at least 1, got {self.until_step}")
        if self.area is not None and self.buckets:
            raise ConfigError(f"{where}: set either area or buckets, not both")
        if self.area is not None and self.area < 32 * 32:
            raise ConfigError(f"{where}.area: must be at least {32 * 32} pixels (one 32x32 patch), got {self.area}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size: must be at least 1, got {self.batch_size}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"{where}.max_tokens: must be at least 1, got {self.max_tokens}")
        if self.max_tokens is not None and self.batch_size is not None:
            raise ConfigError(f"{where}: set either batch_size or max_tokens, not both")
        check_buckets(self.buckets, f"{where}.buckets")


@dataclass
class RegularizationConfig:
    """Images mixed into training to keep what the base model knows (``[data.regularization]``, docs/quality.md)."""

    folders: list[FolderSource | str] = field(default_factory=list)  # same format as data.folders
    ratio: float = 0.0  # fraction of the samples of an epoch drawn from these folders
    weight: float = 1.0  # multiplies each of their samples' loss weight

    def __post_init__(self) -> None:
        self.folders = [FolderSource(path=f) if isinstance(f, str) else f for f in self.folders]

    def validate(self, where: str) -> None:
        for i, folder in enumerate(self.folders):
            folder.validate(f"{where}.folders[{i}]")
        if not 0 <= self.ratio < 1:
            raise ConfigError(f"{where}.ratio: must be in [0, 1), got {self.ratio}")
        if bool(self.folders) != (self.ratio > 0):
            raise ConfigError(f"{where}: folders and a ratio > 0 go together, got {len(self.folders)} folder(s) "
                              f"and ratio {self.ratio}")
        if self.weight < 0:
            raise ConfigError(f"{where}.weight: must be ≥ 0, got {self.weight}")


@dataclass
class DataConfig:
    folders: list[FolderSource | str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    area: int = 1024 * 1024
    buckets: list[list[int]] = field(default_factory=list)
    bucket_step: int = 32
    max_aspect: float = 2.5
    stages: list[DataStage] = field(default_factory=list)
    crop: Literal["center", "random"] = "center"
    small_images: Literal["upscale", "skip"] = "upscale"
    # Images with more pixels are skipped before decoding: one decode costs ~3 bytes per pixel in a worker.
    max_image_pixels: int = 8192 * 8192
    missing_caption: Literal["empty", "skip"] = "empty"
    caption_dropout: float = 0.0
    trigger: str = ""
    shuffle_tags: bool = False
    keep_tags: int = 0
    shuffle_buffer: int = 100
    num_workers: int = 2
    prefetch_factor: int = 2
    pin_memory: bool = True
    max_text_tokens: int = 512
    # > 0: micro-batches packed up to this many tokens, mixing sizes and tasks, instead of train.batch_size
    # images of one bucket (folders only; docs/data.md, "Packing").
    max_tokens: int = 0
    # Shards: where a sample's caption is, first non-blank wins: a member suffix, or "json:" and a .json field.
    shard_captions: list[str] = field(default_factory=lambda: ["txt", "caption", "json:caption", "json:text"])
    missing_control: Literal["skip", "error"] = "skip"  # a target without its control image (edit / IP)
    task_weights: dict[str, float] = field(default_factory=dict)  # loss weight per task: t2i, edit, ip
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)

    def __post_init__(self) -> None:
        self.folders = [FolderSource(path=f) if isinstance(f, str) else f for f in self.folders]

    def validate(self, where: str) -> None:
        if self.folders and self.shards:
            raise ConfigError(
                f"{where}: set either folders or shards, not both "
                "(pack the folders with `python -m hidream_ft.data.pack` to combine them with shards)"
            )
        for i, folder in enumerate(self.folders):
            folder.validate(f"{where}.folders[{i}]")
        if self.regularization.folders and self.shards:
            raise ConfigError(f"{where}.regularization: mixes into data.folders only; pack the regularization "
                              "images into the shards instead")
        for task, weight in self.task_weights.items():
            if task not in ("t2i", "edit", "ip"):
                raise ConfigError(f"{where}.task_weights: unknown task {task!r}; use t2i, edit or ip")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ConfigError(f"{where}.task_weights.{task}: expected a number ≥ 0, got {weight!r}")
        for key, value, low, high in [
            ("caption_dropout", self.caption_dropout, 0.0, 1.0),
            ("max_aspect", self.max_aspect, 1.0, float("inf")),
            ("area", self.area, 32 * 32, float("inf")),
            ("keep_tags", self.keep_tags, 0, float("inf")),
            ("max_image_pixels", self.max_image_pixels, 1, float("inf")),
            ("shuffle_buffer", self.shuffle_buffer, 1, float("inf")),
            ("num_workers", self.num_workers, 0, float("inf")),
            ("prefetch_factor", self.prefetch_factor, 1, float("inf")),
            ("max_tokens", self.max_tokens, 0, float("inf")),
        ]:
            if not low <= value <= high:
                bounds = f"at least {low}" if high == float("inf") else f"between {low} and {high}"
                raise ConfigError(f"{where}.{key}: must be {bounds}, got {value}")
        if self.bucket_step < 32 or self.bucket_step % 32:
            raise ConfigError(f"{where}.bucket_step: must be a multiple of 32, got {self.bucket_step}")
        for i, source in enumerate(self.shard_captions):
            if source.strip(".") in ("", "json:"):
                raise ConfigError(f"{where}.shard_captions[{i}]: expected a member suffix such as \"txt\" or "
                                  f"\"json:FIELD\", got {source!r}")
        check_buckets(self.buckets, f"{where}.buckets")
        bounded = [stage.until_step for stage in self.stages[:-1]]
        if None in bounded:
            raise ConfigError(f"{where}.stages[{bounded.index(None)}].until_step: required on every stage but the last")
        for i in range(1, len(bounded)):
            if bounded[i] <= bounded[i - 1]:
                raise ConfigError(
                    f"{where}.stages[{i}].until_step: {bounded[i]} must be greater than the previous stage's "
                    f"{bounded[i - 1]}"
                )
        for i, stage in enumerate(self.stages):
            stage.validate(f"{where}.stages[{i}]")
        if self.shards and (self.max_tokens or any(stage.max_tokens for stage in self.stages)):
            raise ConfigError(f"{where}.max_tokens: packed micro-batches are planned for data.folders only; use "
                              "batch sizes with shards")


@dataclass
class ParallelConfig:
    activation_checkpointing: Literal["none", "full", "selective", "op"] = "none"
    ac_every: int = 2
    hsdp: bool = False
    # "replicated": every rank holds the frozen base whole (no all-gathers); only trainable weights' gradients
    # are all-reduced. Trades memory for communication (docs/cluster.md).
    frozen_base: Literal["sharded", "replicated"] = "sharded"
    param_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    reduce_dtype: Literal["bfloat16", "float32"] = "float32"
    reshard_after_forward: bool = True
    compile: bool | Literal["auto"] = "auto"
    # "cpu": FSDP keeps the sharded parameters (and their gradients and optimizer state) in CPU memory.
    offload: Literal["none", "cpu"] = "none"

    def validate(self, where: str) -> None:
        if self.ac_every < 1:
            raise ConfigError(f"{where}.ac_every: must be ≥ 1, got {self.ac_every}")


@dataclass
class CheckpointConfig:
    every: int = 500
    keep_last: int = 3
    resume: str = "auto"

    def validate(self, where: str) -> None:
        if self.every < 0:
            raise ConfigError(f"{where}.every: must be ≥ 0 (0 saves only at the end), got {self.every}")


@dataclass
class EmaConfig:
    """An exponential moving average of the trainable parameters (docs/quality.md#ema)."""

    enabled: bool = False
    decay: float = 0.999
    warmup: bool = True  # decay min(decay, (1 + n) / (10 + n)) after n updates
    every: int = 1  # optimizer steps between updates
    for_validation: bool = True  # render validation images with the averaged weights

    def validate(self, where: str) -> None:
        if not 0 <= self.decay < 1:
            raise ConfigError(f"{where}.decay: must be in [0, 1) such as 0.999, got {self.decay}")
        if self.every < 1:
            raise ConfigError(f"{where}.every: must be ≥ 1 (optimizer steps between updates), got {self.every}")


@dataclass
class LoggingConfig:
    output_dir: str = "runs/default"
    log_every: int = 10
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "hidream-ft"
    wandb_run_name: str = ""  # empty: the output folder's name
    # Offline by default: compute nodes often have no network, and an online run needs a login; `wandb sync`
    # uploads an offline run later.
    wandb_mode: str = "offline"

    def validate(self, where: str) -> None:
        if self.log_every < 1:
            raise ConfigError(f"{where}.log_every: must be ≥ 1 (steps between logged scalars), got {self.log_every}")
        if self.wandb_mode not in ("online", "offline"):
            raise ConfigError(f"{where}.wandb_mode: {self.wandb_mode!r} is not one of 'online', 'offline'")
        if self.wandb and not self.wandb_project:
            raise ConfigError(f"{where}.wandb_project: must not be empty when {where}.wandb = true")


@dataclass
class ValidationConfig(SamplingSettings):
    """Sample images during training (docs/sampling.md): the sampling keys of ``hidream_ft.sample``, flat in
    ``[validation]``, plus when to render and which prompts."""

    every: int = 0  # steps between validation renders; 0 turns validation off
    prompts: list[str] = field(default_factory=list)
    # Held-out loss (docs/quality.md): fixed batches from these folders at fixed σ and noise; 0 turns it off.
    loss_every: int = 0
    loss_folders: list[FolderSource | str] = field(default_factory=list)
    loss_shards: list[str] = field(default_factory=list)
    loss_sigmas: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    loss_batch_size: int = 1
    loss_seed: int = 0

    def __post_init__(self) -> None:
        self.loss_folders = [FolderSource(path=f) if isinstance(f, str) else f for f in self.loss_folders]

    def validate(self, where: str) -> None:
        if self.every < 0:
            raise ConfigError(f"{where}.every: must be ≥ 0 (0 turns validation off), got {self.every}")
        if self.every and not self.prompts:
            raise ConfigError(f"{where}.prompts: validation every {self.every} steps needs at least one prompt")
        if self.loss_every < 0:
            raise ConfigError(f"{where}.loss_every: must be ≥ 0 (0 turns the held-out loss off), "
                              f"got {self.loss_every}")
        if self.loss_every and not (self.loss_folders or self.loss_shards):
            raise ConfigError(f"{where}.loss_folders: a held-out loss every {self.loss_every} steps needs held-out "
                              "images: set loss_folders or loss_shards")
        if self.loss_folders and self.loss_shards:
            raise ConfigError(f"{where}: set either loss_folders or loss_shards, not both")
        for i, folder in enumerate(self.loss_folders):
            folder.validate(f"{where}.loss_folders[{i}]")
        if not self.loss_sigmas or not all(0 < sigma <= 1 for sigma in self.loss_sigmas):
            raise ConfigError(f"{where}.loss_sigmas: expected one or more σ in (0, 1], got {self.loss_sigmas}")
        if len(set(self.loss_sigmas)) != len(self.loss_sigmas):
            raise ConfigError(f"{where}.loss_sigmas: a σ is listed twice in {self.loss_sigmas}")
        if self.loss_batch_size < 1:
            raise ConfigError(f"{where}.loss_batch_size: must be at least 1, got {self.loss_batch_size}")
        super().validate(where)


@dataclass
class PreservationConfig:
    """LoRA prior preservation (docs/quality.md): the adapted model's prediction for preservation prompts is
    pulled towards the base model's, on the noisy images of each training micro-batch."""

    prompts: list[str] = field(default_factory=list)
    prompts_file: str = ""  # one prompt per line, added to ``prompts``
    weight: float = 1.0
    every: int = 1  # steps between preservation steps

    @property
    def enabled(self) -> bool:
        return bool(self.prompts or self.prompts_file)

    def validate(self, where: str) -> None:
        if self.weight <= 0:
            raise ConfigError(f"{where}.weight: must be > 0, got {self.weight}")
        if self.every < 1:
            raise ConfigError(f"{where}.every: must be ≥ 1, got {self.every}")
        if any(not prompt.strip() for prompt in self.prompts):
            raise ConfigError(f"{where}.prompts: a prompt is blank in {self.prompts}")


@dataclass
class PerceptualConfig:
    """Perceptual terms added to the loss, computed on the predicted and target images (docs/quality.md)."""

    dino_path: str = ""  # a transformers DINOv2 / DINOv3 folder
    dino_weight: float = 0.0
    lpips_path: str = ""  # one file with the lpips package's state-dict keys (backbone and calibration)
    lpips_net: Literal["alex", "vgg"] = "alex"
    lpips_weight: float = 0.0
    sigma_min: float = 0.0  # the terms apply to samples with σ in [sigma_min, sigma_max]
    sigma_max: float = 1.0
    resolution: int = 224  # both networks see the images squashed to this square side

    @property
    def enabled(self) -> bool:
        return self.dino_weight > 0 or self.lpips_weight > 0

    def validate(self, where: str) -> None:
        # Whether the paths exist is checked when a run starts (trainer.check_inputs), like every input path.
        for name, weight, path in (("dino", self.dino_weight, self.dino_path),
                                   ("lpips", self.lpips_weight, self.lpips_path)):
            if weight < 0:
                raise ConfigError(f"{where}.{name}_weight: must be ≥ 0, got {weight}")
            if weight > 0 and not path:
                raise ConfigError(f"{where}.{name}_path: {name}_weight = {weight} needs a path, got {path!r}")
        if not 0 <= self.sigma_min < self.sigma_max <= 1:
            raise ConfigError(f"{where}.sigma_min / sigma_max: need 0 ≤ sigma_min < sigma_max ≤ 1, "
                              f"got {self.sigma_min}, {self.sigma_max}")
        if self.resolution < 64:
            raise ConfigError(f"{where}.resolution: must be ≥ 64 (the networks' pooling needs it), "
                              f"got {self.resolution}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    full: FullConfig = field(default_factory=FullConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    preservation: PreservationConfig = field(default_factory=PreservationConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    # Parameter grids for launch.submit (dotted key → list of values); the trainer ignores it.
    sweep: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        if self.preservation.enabled and self.train.mode != "lora":
            raise ConfigError("preservation: compares the model with its adapter disabled, so it needs "
                              f"train.mode = 'lora', got {self.train.mode!r}")
        if self.optim.fused_backward:
            # Each parameter is updated as soon as its gradient exists, before the others have theirs.
            if self.train.grad_accum > 1:
                raise ConfigError("optim.fused_backward updates the weights during each backward pass, so "
                                  "gradients cannot accumulate over micro-batches: set train.grad_accum = 1 "
                                  f"(got {self.train.grad_accum}) or optim.fused_backward = false")
            if self.optim.grad_clip > 0:
                raise ConfigError("optim.fused_backward updates each weight before the global gradient norm is "
                                  "known, so it cannot clip: set optim.grad_clip = 0 "
                                  f"(got {self.optim.grad_clip}) or optim.fused_backward = false")


def _relative_to_file(table: dict, folder: Path) -> None:
    """Rewrite the path values of a file's ``table`` that start with ``./`` or ``../`` to start at ``folder``."""

    def rebase(value):
        if isinstance(value, str) and value.startswith(("./", "../")):
            return os.path.normpath(folder / value)
        return value

    for section, key in (("model", "path"), ("model", "weights"), ("logging", "output_dir"),
                         ("checkpoint", "resume"), ("preservation", "prompts_file"), ("perceptual", "dino_path"),
                         ("perceptual", "lpips_path")):
        if isinstance(table.get(section), dict) and key in table[section]:
            table[section][key] = rebase(table[section][key])
    validation = table.get("validation")
    if isinstance(validation, dict):
        _rebase_folders(validation, "loss_folders", rebase)
        if isinstance(validation.get("loss_shards"), list):
            validation["loss_shards"] = [rebase(pattern) for pattern in validation["loss_shards"]]
    data = table.get("data")
    if not isinstance(data, dict):
        return
    if isinstance(data.get("shards"), list):
        data["shards"] = [rebase(pattern) for pattern in data["shards"]]
    _rebase_folders(data, "folders", rebase)
    if isinstance(data.get("regularization"), dict):
        _rebase_folders(data["regularization"], "folders", rebase)


def _rebase_folders(section: dict, key: str, rebase) -> None:
    """Apply ``rebase`` to the paths of a folder list (``data.folders``, ``data.regularization.folders``,
    ``validation.loss_folders``)."""
    entries = section.get(key)
    for i, folder_entry in enumerate(entries if isinstance(entries, list) else []):
        if isinstance(folder_entry, dict):
            for name in ("path", "control_dir", "mask_dir"):
                if name in folder_entry:
                    folder_entry[name] = rebase(folder_entry[name])
            if isinstance(folder_entry.get("control_dirs"), list):
                folder_entry["control_dirs"] = [rebase(d) for d in folder_entry["control_dirs"]]
        else:
            entries[i] = rebase(folder_entry)


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read a TOML file (or start from defaults), apply ``key=value`` overrides, validate.

    Paths in the file that start with ``./`` or ``../`` are relative to the file's folder; every other relative
    path, and any given in ``overrides``, is relative to the current directory."""
    table = read_toml(path, "config file") if path is not None else {}
    where = str(path) if path is not None else "config"
    if path is not None:
        _relative_to_file(table, Path(path).parent)
    apply_overrides(table, overrides)
    try:
        return build_table(Config, table)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """The resolved configuration as a TOML file that :func:`load_config` reads back unchanged.

    TOML has no null: keys whose value is None (their default) are left out."""
    return write_toml(to_dict(cfg))
