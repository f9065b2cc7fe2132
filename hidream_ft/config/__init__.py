"""TOML files validated into typed dataclasses; every key is documented in docs/config.md."""

from hidream_ft.config.training import (
    CheckpointConfig, Config, ConfigError, DataConfig, DataStage, DiffusionConfig, FolderSource, FullConfig,
    LoggingConfig, LoraConfig, ModelConfig, OptimConfig, ParallelConfig, SlurmConfig, TrainConfig,
    ValidationConfig, build_table, check_buckets, load_config, read_toml, to_dict, to_toml,
)

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DataStage", "DiffusionConfig", "FolderSource",
    "FullConfig", "LoggingConfig", "LoraConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "SlurmConfig",
    "TrainConfig", "ValidationConfig", "build_table", "check_buckets", "load_config", "read_toml", "to_dict",
    "to_toml",
]
