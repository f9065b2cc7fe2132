"""TOML files validated into typed dataclasses; every key is documented in docs/config.md."""

from hidream_ft.config.cluster import SlurmConfig
from hidream_ft.config.sampling import RECIPES, SamplingSettings
from hidream_ft.config.toml import ConfigError, build_table, parse_literal, read_toml, toml_literal, write_toml
from hidream_ft.config.training import (
    AttentionKind, CheckpointConfig, Config, DataConfig, DataStage, DiffusionConfig, EmaConfig, FolderSource,
    FullConfig, LoggingConfig, LoraConfig, ModelConfig, ModelDtype, OptimConfig, ParallelConfig, PerceptualConfig,
    PreservationConfig, RegularizationConfig, TrainConfig, ValidationConfig, check_buckets, load_config, to_dict,
    to_toml,
)

__all__ = [
    "AttentionKind", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DataStage", "DiffusionConfig",
    "EmaConfig", "FolderSource", "FullConfig", "LoggingConfig", "LoraConfig", "ModelConfig", "ModelDtype",
    "OptimConfig", "ParallelConfig", "PerceptualConfig", "PreservationConfig", "RECIPES", "RegularizationConfig",
    "SamplingSettings", "SlurmConfig", "TrainConfig", "ValidationConfig", "build_table", "check_buckets",
    "load_config", "parse_literal", "read_toml", "to_dict", "to_toml", "toml_literal", "write_toml",
]
