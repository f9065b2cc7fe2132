"""Training configuration: TOML files validated into typed dataclasses.

Every key is documented in ``docs/config.md``; a test keeps that page and these dataclasses in sync.
Unknown keys and wrong types raise :class:`ConfigError` naming the key, the file and the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


@dataclass
class ModelConfig:
    path: str = ""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    attention: Literal["split", "dense"] = "split"


@dataclass
class LoraConfig:
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    use_rslora: bool = False
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    train_heads: list[str] = field(default_factory=list)
    include_visual: bool = False


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
    noise_scale: float = 8.0
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
    stochastic_rounding: bool = False  # adamw8bit: round bf16 weight updates stochastically (docs/optimizers.md)

    def validate(self, where: str) -> None:
        if self.stochastic_rounding and self.name != "adamw8bit":
            raise ConfigError(f"{where}.stochastic_rounding: only optim.name = 'adamw8bit' implements it, "
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

    def validate(self, where: str) -> None:
        if self.until_step is not None and self.until_step < 1:
            raise ConfigError(f"{where}.until_step: must be at least 1, got {self.until_step}")
        if self.area is not None and self.buckets:
            raise ConfigError(f"{where}: set either area or buckets, not both")
        if self.area is not None and self.area < 32 * 32:
            raise ConfigError(f"{where}.area: must be at least {32 * 32} pixels (one 32x32 patch), got {self.area}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size: must be at least 1, got {self.batch_size}")
        check_buckets(self.buckets, f"{where}.buckets")


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
    missing_control: Literal["skip", "error"] = "skip"  # a target without its control image (edit / IP)
    task_weights: dict[str, float] = field(default_factory=dict)  # loss weight per task: t2i, edit, ip

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
            ("shuffle_buffer", self.shuffle_buffer, 1, float("inf")),
            ("num_workers", self.num_workers, 0, float("inf")),
            ("prefetch_factor", self.prefetch_factor, 1, float("inf")),
        ]:
            if not low <= value <= high:
                bounds = f"at least {low}" if high == float("inf") else f"between {low} and {high}"
                raise ConfigError(f"{where}.{key}: must be {bounds}, got {value}")
        if self.bucket_step < 32 or self.bucket_step % 32:
            raise ConfigError(f"{where}.bucket_step: must be a multiple of 32, got {self.bucket_step}")
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


@dataclass
class ParallelConfig:
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    ac_every: int = 2
    hsdp: bool = False
    param_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    reduce_dtype: Literal["bfloat16", "float32"] = "float32"
    reshard_after_forward: bool = True
    compile: bool = False

    def validate(self, where: str) -> None:
        if self.ac_every < 1:
            raise ConfigError(f"{where}.ac_every: must be ≥ 1, got {self.ac_every}")


@dataclass
class CheckpointConfig:
    every: int = 500
    keep_last: int = 3
    resume: str = "auto"


@dataclass
class LoggingConfig:
    output_dir: str = "runs/default"
    log_every: int = 10
    tensorboard: bool = True


# Keys of [slurm] that have their own field here; `slurm.sbatch` may not set them behind the launcher's back.
_MANAGED_SBATCH_OPTIONS = {
    "nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "partition", "account", "qos", "time",
    "constraint", "mem", "exclusive", "job-name", "signal", "requeue", "array", "dependency", "output", "error",
    "open-mode",
}


@dataclass
class SlurmConfig:
    """Resources and policies for ``python -m launch.submit`` (docs/cluster.md)."""

    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int = 0  # 0: one task per GPU (one task when gpus_per_node = 0)
    cpus_per_task: int = 0  # 0: the cluster's default
    partition: str = ""
    account: str = ""
    qos: str = ""
    time_min: int = 1440
    constraint: str = ""
    mem: str = ""
    exclusive: bool = False
    job_name: str = "hidream-ft"
    signal_delay_s: int = 120
    max_timeouts: int = 3
    array_parallelism: int = 16
    folder: str = ""
    setup: list[str] = field(default_factory=list)
    srun_args: list[str] = field(default_factory=list)
    sbatch: dict[str, Any] = field(default_factory=dict)
    export_gpus: int = 1
    export_time_min: int = 60

    def validate(self, where: str) -> None:
        at_least = {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 0, "cpus_per_task": 0, "time_min": 1,
                    "signal_delay_s": 0, "max_timeouts": 0, "array_parallelism": 1, "export_gpus": 0,
                    "export_time_min": 1}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ConfigError(f"{where}.{name}: must be ≥ {low}, got {getattr(self, name)}")
        if self.signal_delay_s >= self.time_min * 60:
            raise ConfigError(f"{where}.signal_delay_s: {self.signal_delay_s} s leaves no run time within "
                              f"time_min = {self.time_min} min")
        for key, value in self.sbatch.items():
            if key.replace("_", "-") in _MANAGED_SBATCH_OPTIONS:
                raise ConfigError(f"{where}.sbatch.{key}: set by the launcher; use the slurm.* key of that name")
            if not isinstance(value, (str, int, bool)):
                raise ConfigError(f"{where}.sbatch.{key}: expected a string, integer or boolean, got {value!r}")

    @property
    def tasks(self) -> int:
        """Tasks (training processes) per node."""
        return self.tasks_per_node or max(1, self.gpus_per_node)


@dataclass
class ValidationConfig:
    """Sample images during training (docs/sampling.md); the sampling keys are those of ``hidream_ft.sample``."""

    every: int = 0  # steps between validation renders; 0 turns validation off
    prompts: list[str] = field(default_factory=list)
    steps: int = 50
    cfg: float = 5.0
    shift: float = 3.0
    scheduler: Literal["unipc", "flow_match", "flash"] = "unipc"
    seed: int = 0
    width: int = 1024
    height: int = 1024
    noise_scale: float = 8.0
    noise_clip_std: float = 0.0
    timesteps: list[int] = field(default_factory=list)

    def validate(self, where: str) -> None:
        if self.every < 0:
            raise ConfigError(f"{where}.every: must be ≥ 0 (0 turns validation off), got {self.every}")
        if self.every and not self.prompts:
            raise ConfigError(f"{where}.prompts: validation every {self.every} steps needs at least one prompt")
        from hidream_ft.config.sampling import SamplingSettings  # deferred: the sampler imports this module

        SamplingSettings.from_fields(self).validate(where)


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
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    # Parameter grids for launch.submit (dotted key → list of values); the trainer ignores it.
    sweep: dict[str, Any] = field(default_factory=dict)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return _build(tp, value, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def _build(cls: type, table: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in table.items():
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(where)
    return obj


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=1e-4")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings need no quotes on the command line
    return key.strip().split("."), value


def _merge(table: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--set {'.'.join(path)}: '{part}' is not a table")
    table[path[-1]] = value


def read_toml(path: str | Path, what: str) -> dict:
    """A TOML file as a table; a missing file or a syntax error is a :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def build_table(cls: type, table: dict, where: str = "") -> Any:
    """Validate a table into the dataclass ``cls`` with the same rules and errors as the training config."""
    return _build(cls, table, where)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a TOML file (or start from defaults), apply ``key=value`` overrides, validate."""
    table = read_toml(path, "config file") if path is not None else {}
    where = str(path) if path is not None else "config"
    for item in overrides:
        _merge(table, *_parse_override(item))
    return _build_root(table, where)


def _build_root(table: dict, where: str) -> Config:
    try:
        return _build(Config, table, "")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: Config) -> str:
    """The resolved configuration as a TOML file that :func:`load_config` reads back unchanged.

    TOML has no null: keys whose value is None (their default) are left out."""
    lines: list[str] = []
    for section, table in to_dict(cfg).items():
        scalars = {k: v for k, v in table.items() if not (isinstance(v, list) and v and isinstance(v[0], dict))}
        arrays = {k: v for k, v in table.items() if k not in scalars}
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in scalars.items() if v is not None]
        lines.append("")
        for key, items in arrays.items():
            for item in items:
                lines.append(f"[[{section}.{key}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in item.items() if v is not None]
                lines.append("")
    return "\n".join(lines)
