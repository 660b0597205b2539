"""The typed run config: its schema (dataclasses with the paper's defaults), its loader and its reference docs."""

from megatron_sayo.config.loader import config_from_dict, load_config, parse_override, read_config_file
from megatron_sayo.config.reference import describe, field_docs, reference_markdown
from megatron_sayo.config.schema import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    LogConfig,
    LoRAConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RewardConfig,
    RewardWeights,
    RolloutConfig,
    RunConfig,
    SuiteConfig,
    TrainConfig,
    WarmupConfig,
    synthetic_eval_n,
    synthetic_files,
)

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "EvalConfig", "LogConfig", "LoRAConfig", "LossConfig",
    "ModelConfig", "OptimConfig", "ParallelConfig", "RewardConfig", "RewardWeights", "RolloutConfig", "RunConfig",
    "SuiteConfig", "TrainConfig", "WarmupConfig", "config_from_dict", "describe", "field_docs", "load_config",
    "parse_override", "read_config_file", "reference_markdown", "synthetic_eval_n", "synthetic_files",
]
