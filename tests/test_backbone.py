import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxFillPipeline

import vis2ir
from vis2ir import backbone as bb
from vis2ir.backbone import build_tiny_text_encoders, build_tiny_vae, build_transformer, load_backbone
from vis2ir.errors import Vis2IRError


def test_random_backbone_shapes(tiny_config):
    cfg = tiny_config()
    b = load_backbone(cfg.model)
    assert b.transformer.config.in_channels == 64 + 64 + 256  # x_t + masked latents + mask (VAE codec)
    assert b.transformer.config.out_channels == 64
    assert b.prompt.prompt_embeds.shape == (1, 8, 32) and b.prompt.pooled_prompt_embeds.shape == (1, 32)
    p = load_backbone(tiny_config("model.codec=pixel", "model.pixel_factor=4").model)
    assert p.transformer.config.in_channels == 192 + 192 + 64


def test_prompt_embeddings_are_cached_and_encoders_not_rebuilt(tiny_config, monkeypatch):
    cfg = tiny_config()
    first = load_backbone(cfg.model).prompt
    calls = []
    real = bb.build_tiny_text_encoders
    monkeypatch.setattr(bb, "build_tiny_text_encoders", lambda c: calls.append(c) or real(c))
    second = load_backbone(cfg.model).prompt
    assert calls == [] and torch.equal(first.prompt_embeds, second.prompt_embeds)
    third = load_backbone(tiny_config("model.prompt=a different prompt").model).prompt
    assert len(calls) == 1 and not torch.equal(first.prompt_embeds, third.prompt_embeds)


@pytest.fixture(scope="module")
def local_flux(tmp_path_factory, request):
    """A tiny model saved in diffusers FluxFillPipeline layout, as a user's local copy would be."""
    from vis2ir.config import load_config

    from tests.conftest import TINY_MODEL

    cfg = load_config(None, TINY_MODEL).model
    root = tmp_path_factory.mktemp("flux")
    torch.manual_seed(0)
    vae = build_tiny_vae(cfg)
    transformer = build_transformer(cfg, 384, 64)
    pipe = FluxFillPipeline(scheduler=None, vae=vae, transformer=transformer, **build_tiny_text_encoders(cfg))
    for name in ("vae", "transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        getattr(pipe, name).save_pretrained(root / name)
    return root, pipe


def test_loads_a_local_fluxfill_folder(local_flux, tiny_config):
    root, pipe = local_flux
    cfg = tiny_config("model.weights=pretrained", f"model.flux_path={root}")
    b = load_backbone(cfg.model)
    ref = dict(pipe.transformer.state_dict())
    assert all(torch.equal(v, ref[k]) for k, v in b.transformer.state_dict().items())
    embeds, pooled, _ = pipe.encode_prompt(cfg.model.prompt, None, max_sequence_length=8)
    # T5 is loaded in bf16 (T5-XXL is 9.5 GB even so): bf16 rounding, not fp32 equality.
    assert torch.allclose(b.prompt.prompt_embeds, embeds, rtol=2e-2, atol=2e-2)
    assert torch.allclose(b.prompt.pooled_prompt_embeds, pooled, atol=1e-6)
    assert b.codec.latent_channels == 16 and b.codec.shift == pytest.approx(0.1159)


def test_local_folder_missing_a_file(local_flux, tmp_path, tiny_config):
    import shutil

    root, _ = local_flux
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    (broken / "vae" / "config.json").unlink()
    cfg = tiny_config("model.weights=pretrained", f"model.flux_path={broken}")
    with pytest.raises(Vis2IRError, match="the folder lacks vae/config.json"):
        load_backbone(cfg.model)


@pytest.mark.parametrize("env, reason", [
    ({"HF_HUB_OFFLINE": "1"}, "not in the local Hub cache and HF_HUB_OFFLINE is set"),
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "the Hub cannot be reached"),
])
def test_missing_weights_message_is_fast_and_clear(env, reason, tmp_path, monkeypatch, tiny_config, hub_calls):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = tiny_config("model.weights=pretrained", "model.flux_path=black-forest-labs/FLUX.1-Fill-dev")
    with pytest.raises(Vis2IRError) as err:
        bb.resolve_flux_path(cfg.model.flux_path)
    assert hub_calls == {"auth_check": int("HF_ENDPOINT" in env), "snapshot_download": 0}  # one request, no retry
    msg = str(err.value)
    assert reason in msg and "black-forest-labs/FLUX.1-Fill-dev" in msg and "licence" in msg
    assert "HF_TOKEN" in msg and "model.flux_path=/path/to/FLUX.1-Fill-dev" in msg and "\n" not in msg


def test_missing_weights_from_the_command_line(tmp_path):
    """Through the CLI: one line on stderr, exit 2, no traceback."""
    src = str(Path(vis2ir.__file__).parents[1])
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": src}
    proc = subprocess.run([sys.executable, "-m", "vis2ir.cli", "demo", "--out", str(tmp_path / "o"),
                           "--config", "configs/vis2ir_none.yaml", "data.source=thermalscenes", "data.size=64",
                           f"model.prompt_cache_dir={tmp_path / 'pc'}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("vis2ir: error:")]
    assert len(lines) == 1 and "black-forest-labs/FLUX.1-Fill-dev" in lines[0]
    assert "Traceback" not in proc.stderr


def test_local_folder_without_weights(local_flux, tmp_path, tiny_config):
    """A copy with every config but a weight folder emptied (an interrupted copy) is refused, naming it."""
    import shutil

    root, _ = local_flux
    broken = tmp_path / "noweights"
    shutil.copytree(root, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = tiny_config("model.weights=pretrained", f"model.flux_path={broken}")
    with pytest.raises(Vis2IRError, match=r"the folder's weights are incomplete: transformer/ has no weights file"):
        load_backbone(cfg.model)
