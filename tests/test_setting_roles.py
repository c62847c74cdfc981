"""Setting roles: declared once in the schema, the checks of checkpoints, latent caches and resumes derive
from them, and a setting added without roles fails here."""

from dataclasses import dataclass, field
from typing import Annotated

import pytest

from vis2ir.checkpoint import STRUCTURAL
from vis2ir.config import Config, keys_with_role, setting_roles
from vis2ir.latent_cache import LATENT_SETTINGS
from vis2ir.config.roles import MODEL, NO_ROLE, UndeclaredRoles, declared_roles, section_roles
from vis2ir.train import RESUMABLE

# The role sets, written out: a setting that changes role, or a new setting, is decided here on purpose.
MODEL_KEYS = {
    "model.backbone", "model.weights", "model.codec", "model.pixel_factor", "model.seed",
    *(f"model.transformer.{k}" for k in ("num_layers", "num_single_layers", "attention_head_dim",
                                         "num_attention_heads", "joint_attention_dim", "pooled_projection_dim",
                                         "axes_dims_rope", "guidance_embeds", "init")),
    *(f"model.vae.{k}" for k in ("block_out_channels", "latent_channels", "layers_per_block", "norm_num_groups")),
    "model.text.num_layers", "model.text.seed",
    *(f"model.semantic.{k}" for k in ("mode", "num_layers", "num_heads", "position", "rope_min_wavelength",
                                      "rope_max_wavelength", "inject_into", "fusion_alpha")),
    "model.lora.rank", "model.lora.target_modules", "train.finetune",
}
DATA_KEYS = {f"data.{k}" for k in ("source", "layout", "visible_column", "infrared_column", "semantic_column",
                                   "triptych_column", "name_column", "semantic_dir", "semantic_source", "boxes", "box_classes",
                                   "segment_model", "val_fraction", "test_fraction", "synth_count", "synth_seed")}
# Which samples a split holds, and where the data lies, are no latent settings: the cache records its source's
# identity (names, files, contents) and checks it (`vis2ir.latent_cache.check_source`), so a moved folder or a
# changed split fraction is judged by the samples themselves.
MEMBERSHIP = {f"data.{k}" for k in ("source", "name_column", "val_fraction", "test_fraction", "synth_count")}
LATENT_KEYS = {
    "model.flux_path", "model.backbone", "model.weights", "model.codec", "model.pixel_factor", "model.seed",
    *(k for k in MODEL_KEYS if k.startswith("model.vae.")), "model.semantic.mode", "model.semantic.fusion_alpha",
    *(DATA_KEYS - MEMBERSHIP), *(f"data.{k}" for k in ("size", "resize_policy", "max_aspect", "hflip",
                                                      "ir_normalize", "ir_percentiles", "ir_range")),
}
FLAT = Config().flat()
RESUMABLE_KEYS = {
    "model.prompt_cache_dir", "data.num_workers", "data.synth_prerender",
    *(f"train.{k}" for k in ("max_steps", "max_minutes", "output_dir", "checkpoint_every", "keep_last", "log_every",
                             "val_every", "val_batches", "max_bad_steps", "gradient_checkpointing",
                             "memory_budget_gib", "compile")),
    *(k for k in FLAT if k.startswith(("sample.", "eval."))),
}
EXPECTED = {"model": MODEL_KEYS, "latent": LATENT_KEYS, "resumable": RESUMABLE_KEYS, "data": DATA_KEYS}


def test_every_setting_declares_roles_and_the_role_sets_are_these():
    roles = setting_roles()  # raises UndeclaredRoles for a setting without roles
    assert list(roles) == list(FLAT)
    for role, keys in EXPECTED.items():
        assert set(keys_with_role(role)) == keys, role
    # settings of no role stay fixed for a run: among them the run's base and the training hyper-parameters
    assert roles["train.init_from"] == frozenset() and roles["train.learning_rate"] == frozenset()


@pytest.mark.parametrize("role, derived", [("model", STRUCTURAL), ("latent", LATENT_SETTINGS),
                                           ("resumable", RESUMABLE)])
def test_the_old_lists_are_derived_from_the_roles(role, derived):
    """The prefix tuples the checks use (with `str.startswith`) select exactly the keys with the role."""
    chosen = {k for k in FLAT if k.startswith(derived)}
    assert chosen == EXPECTED[role]


def test_a_setting_without_roles_is_refused():
    @dataclass
    class Part:
        declared: Annotated[int, MODEL] = 1
        forgotten: int = 2

    @dataclass
    class Root:
        part: Part = field(default_factory=Part)
        other: Annotated[str, NO_ROLE] = ""

    with pytest.raises(UndeclaredRoles, match="'part.forgotten'"):
        declared_roles(Root)

    @section_roles(MODEL)
    @dataclass
    class Whole:
        anything: int = 1
        own: Annotated[int, NO_ROLE] = 2

    assert declared_roles(Whole) == {"anything": {"model"}, "own": frozenset()}
