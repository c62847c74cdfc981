"""Shared fixtures: tiny models built from configuration (nothing is downloaded)."""

import pytest
import torch

from vis2ir.config import load_config

# Tiny models on a 2-core machine: one intra-op thread is faster than two fighting over the cores.
torch.set_num_threads(1)

# A FLUX-architecture transformer small enough for CPU tests (sum(axes_dims_rope) == head dim).
TINY_MODEL = [
    "model.backbone=random",
    "model.max_sequence_length=8",
    "model.transformer.num_layers=1",
    "model.transformer.num_single_layers=1",
    "model.transformer.attention_head_dim=16",
    "model.transformer.num_attention_heads=2",
    "model.transformer.joint_attention_dim=32",
    "model.transformer.pooled_projection_dim=32",
    "model.transformer.axes_dims_rope=[4,6,6]",
]


@pytest.fixture
def tiny_config(tmp_path):
    """`tiny_config(*overrides)` → a validated Config for a tiny random backbone."""

    def make(*overrides):
        return load_config(None, [*TINY_MODEL, f"model.prompt_cache_dir={tmp_path / 'prompt_cache'}", *overrides])

    return make
