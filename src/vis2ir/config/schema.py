"""The settings' schema: `Config`, one typed dataclass per section (`schema_model`, `schema_data`,
`schema_train`, `schema_sample`), and what the schema says of its settings (their roles, their dotted keys)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vis2ir.config.checks import SEED_LIMIT, check
from vis2ir.config.roles import declared_roles, prefixes, role_name
from vis2ir.config.schema_data import DataConfig
from vis2ir.config.schema_model import ModelConfig
from vis2ir.config.schema_sample import EvalConfig, SampleConfig
from vis2ir.config.schema_train import TrainConfig
from vis2ir.files import write_text


@dataclass
class Config:
    """Every setting, one section per field (`model`, `data`, `train`, `sample`, `eval`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """The settings as nested plain YAML types (lists for tuples), section by section."""
        return _to_plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """Every setting by its dotted key (`model.semantic.mode`), values as plain YAML types."""
        return flatten(self.to_dict())

    def save(self, path: str | Path) -> None:
        """Write the config as YAML, atomically."""
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def validate(self) -> Config:
        """`self` once every value is finite, in its range and agrees with the other sections' (fsdp and
        quantization, seeds and noise draws); else a one-line `ConfigError` naming the first bad setting."""
        for key, value in self.flat().items():  # NaN passes no range check but fails every comparison
            for v in value if isinstance(value, list) else [value]:
                check(not isinstance(v, float) or math.isfinite(v), key, "a finite number", value)
        for part in (self.model, self.data, self.train, self.sample, self.eval):
            part.validate()
        check(self.sample.seed + self.eval.noise_draws <= SEED_LIMIT, "eval.noise_draws",
              f"at most {SEED_LIMIT} - sample.seed (the draws use seeds sample.seed, sample.seed + 1, ...)",
              self.eval.noise_draws)
        check(self.train.strategy != "fsdp" or self.model.quantize == "none", "model.quantize",
              "none with train.strategy=fsdp (a quantized base cannot be sharded: train.strategy=ddp trains on "
              "it, or fsdp shards a bf16 base with model.quantize=none)", self.model.quantize)
        check(self.train.semantic_dropout == 0 or self.model.semantic.mode != "none", "train.semantic_dropout",
              "0 with model.semantic.mode=none (there is no map to drop)", self.train.semantic_dropout)
        check(self.train.semantic_dropout == 0 or self.data.latent_cache is None, "train.semantic_dropout",
              "0 with data.latent_cache (the cache holds each map encoded; train from the images to drop maps)",
              self.train.semantic_dropout)
        backbone = self.model.backbone
        if backbone in ("flux1-kontext", "flux2-klein"):  # not yet supported with these (vis2ir.backbones)
            check(self.data.latent_cache is None, "data.latent_cache",
                  f"none with model.backbone={backbone} (its latent cache is not yet supported)",
                  self.data.latent_cache)
            check(self.train.loss_region == "target", "train.loss_region",
                  f"target with model.backbone={backbone} (it predicts the target tokens only)",
                  self.train.loss_region)
        if backbone == "flux2-klein":  # what does not apply to klein, or does not work with it yet
            check(self.train.guidance == 1.0, "train.guidance",
                  "1 with model.backbone=flux2-klein (it has no guidance embedding; sample.guidance > 1 runs true "
                  "classifier-free guidance when sampling)", self.train.guidance)
            check(self.sample.cache != "first_block", "sample.cache",
                  "none or taylorseer with model.backbone=flux2-klein (diffusers' First-Block-Cache fails on "
                  "FLUX.2's blocks)", self.sample.cache)
            check(self.sample.guidance <= KLEIN_MAX_GUIDANCE, "sample.guidance",
                  f"at most {KLEIN_MAX_GUIDANCE:g} with model.backbone=flux2-klein (its true classifier-free guidance "
                  "scale; diffusers' example uses 4, configs/vis2ir_klein.yaml too; 50 is FLUX.1 Fill's embedded "
                  "guidance)", self.sample.guidance)
            check(self.sample.cache == "none" or self.sample.guidance <= 1, "sample.cache",
                  "none with model.backbone=flux2-klein and sample.guidance > 1 (a step cache does not yet follow "
                  "true classifier-free guidance's two passes a step)", self.sample.cache)
        return self


KLEIN_MAX_GUIDANCE = 10.0  # well above the CFG scales FLUX.2 klein is sampled at (diffusers' example: 4)


# ----------------------------------------------------------------------------------------------
# Roles (`vis2ir.config.roles`): declared beside each setting's type in the sections


def setting_roles() -> dict[str, frozenset[str]]:
    """Every setting's roles ('model', 'latent', 'resumable', 'data') by dotted key, as declared in the schema."""
    return declared_roles(Config)


def keys_with_role(role: str) -> tuple[str, ...]:
    """The dotted keys of the settings with `role` ('model', 'latent', 'resumable' or 'data'), in schema order;
    `ValueError` for another role."""
    name = role_name(role)
    return tuple(k for k, r in setting_roles().items() if name in r)


def role_prefixes(role: str) -> tuple[str, ...]:
    """`keys_with_role(role)` for `str.startswith`, a section whose settings all have the role as one prefix
    (`sample.`): short enough to list in a message."""
    return prefixes(setting_roles(), role)


def first_difference(old: dict[str, Any], new: dict[str, Any], prefixes: tuple[str, ...]):
    """The first dotted key under `prefixes` whose value differs, as `(key, old, new)`, or None."""
    for key in sorted(old):
        if key.startswith(prefixes) and old[key] != new.get(key):
            return key, old[key], new.get(key)
    return None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested settings → one level of dotted keys (`{"sample": {"steps": 28}}` → `{"sample.steps": 28}`)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value
