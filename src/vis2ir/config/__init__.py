"""Typed settings: dataclasses loaded from YAML, dotted command-line overrides, validation.

Every setting lives in one of the schema's dataclasses, with its meaning (the comment beside it) and its
roles (its annotation, `roles`): `schema` holds `Config` and its sections `schema_model`, `schema_data`,
`schema_train` and `schema_sample` (sample and eval). `loading` reads a YAML file (`yamltext`) into them,
applies `key.path=value` overrides and validates (`load_config`); `migrate` replaces the values older files
hold that are no longer offered; `reference` writes `vis2ir config show`. Torch-free: commands load and
check settings before torch is imported.
"""

from vis2ir.config.checks import SEED_EXPECTED, SEED_LIMIT, ConfigError, check_seed
from vis2ir.config.loading import check_config, from_dict, load_config, read_yaml
from vis2ir.config.migrate import RETIRED
from vis2ir.config.reference import describe_settings, setting_meanings
from vis2ir.config.schema import Config, first_difference, keys_with_role, role_prefixes, setting_roles
from vis2ir.config.schema_data import DEFAULT_SEGMENTER, DataConfig
from vis2ir.config.schema_model import (DEFAULT_INSTRUCTION, ICEDIT_LORA_TARGETS, ICEDIT_PROMPT, LoraConfig,
                                        ModelConfig, SemanticConfig, SemanticMode, TextConfig, TransformerConfig,
                                        VAEConfig)
from vis2ir.config.schema_sample import APP_KEEP_MINUTES, APP_MAX_UPLOAD_MIB, PRED_VALUES, EvalConfig, SampleConfig
from vis2ir.config.schema_train import TrainConfig

__all__ = [
    "APP_KEEP_MINUTES", "APP_MAX_UPLOAD_MIB", "DEFAULT_INSTRUCTION", "DEFAULT_SEGMENTER", "ICEDIT_LORA_TARGETS",
    "ICEDIT_PROMPT", "PRED_VALUES", "RETIRED", "SEED_EXPECTED", "SEED_LIMIT", "Config", "ConfigError", "DataConfig",
    "EvalConfig", "LoraConfig", "ModelConfig", "SampleConfig", "SemanticConfig", "SemanticMode", "TextConfig",
    "TrainConfig", "TransformerConfig", "VAEConfig", "check_config", "check_seed", "describe_settings",
    "first_difference", "from_dict", "keys_with_role", "load_config", "read_yaml", "role_prefixes",
    "setting_meanings", "setting_roles",
]
