"""Shared fixtures: tiny models built from configuration (nothing is downloaded)."""

import pytest
import torch

from vis2ir.config import load_config

# Tiny models on a 2-core machine: one intra-op thread is faster than two fighting over the cores.
torch.set_num_threads(1)

# A FLUX-architecture transformer small enough for CPU tests (sum(axes_dims_rope) == head dim).
TINY_MODEL = [
    "model.weights=random",
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


def stock_pipeline_outputs(transformer, lora_dir, *others):
    """A tiny transformer's output on fixed inputs before and after a stock diffusers
    `FluxFillPipeline.load_lora_weights(lora_dir)`, then the outputs of `others` on the same inputs."""
    from diffusers import FluxFillPipeline

    pipe = FluxFillPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=transformer)
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(1, 8, transformer.config.in_channels, generator=g)  # 384 for FLUX Fill's VAE codec
    kwargs = dict(timestep=torch.tensor([0.5]), guidance=torch.tensor([1.0]),
                  pooled_projections=torch.randn(1, 32, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g), txt_ids=torch.zeros(8, 3),
                  img_ids=torch.zeros(8, 3), return_dict=False)
    with torch.no_grad():
        before = transformer(hidden_states=hidden, **kwargs)[0]
        pipe.load_lora_weights(lora_dir)
        after = transformer(hidden_states=hidden, **kwargs)[0]
        return (before, after, *(m(hidden_states=hidden, **kwargs)[0] for m in others))


@pytest.fixture
def hub_calls(monkeypatch):
    """Counts the Hub requests a failing lookup makes: one quick `auth_check` at most, never a download
    (a `snapshot_download(local_files_only=True)` reads the local cache only and is not counted): the
    "fails within seconds, no retry loop" promise, checked by what is called, not by a clock."""
    import huggingface_hub

    calls = {"auth_check": 0, "snapshot_download": 0}
    real = {name: getattr(huggingface_hub, name) for name in calls}

    def counted(name):
        def wrapper(*args, **kwargs):
            calls[name] += not kwargs.get("local_files_only", False)
            return real[name](*args, **kwargs)
        return wrapper

    for name in calls:
        monkeypatch.setattr(huggingface_hub, name, counted(name))
    return calls


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """Inductor cannot build here: no C++ compiler, no cached kernels (torch.compile fails on first use).
    Through `config.patch`, which restores the settings exactly (monkeypatching the sub-config's attribute did
    not survive its undo in a full run)."""
    import torch._inductor.config as inductor

    missing = str(tmp_path / "no-such-compiler")
    monkeypatch.setenv("CXX", missing)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    with inductor.patch({"cpp.cxx": (missing,), "force_disable_caches": True}):  # else earlier kernels are reused
        yield
    torch._dynamo.reset()
