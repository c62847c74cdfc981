import copy
import logging

import pytest
import torch

from vis2ir.backbone import load_backbone
from vis2ir.config import SemanticConfig
from vis2ir.errors import Vis2IRError
from vis2ir.model import Vis2IRModel


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    from vis2ir.config import load_config

    from tests.conftest import TINY_MODEL

    cfg = load_config(None, [*TINY_MODEL, "model.codec=pixel",
                             f"model.prompt_cache_dir={tmp_path_factory.mktemp('pc')}"])
    return load_backbone(cfg.model)


def batch(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, 3, size, size, generator=g) for _ in range(3)]


@pytest.mark.parametrize("mode, tokens", [("none", 32), ("pixel_fusion", 32), ("cross_attention", 32),
                                          ("channel_concat", 32), ("in_context", 48)])
def test_every_mode_predicts_the_velocity(backbone, mode, tokens):
    model = Vis2IRModel(copy.deepcopy(backbone), SemanticConfig(mode=mode))
    vis, ir, sem = batch()
    noise = torch.randn(2, tokens, 192)
    out = model(vis, ir, sem, torch.tensor([0.2, 0.9]), noise)
    assert out.pred.shape == out.target.shape == (2, tokens, 192)
    enc = model.encode(vis, ir, sem)
    assert torch.allclose(out.target, noise - enc.x_0)
    assert model.target_tokens(enc).sum() == 16  # one 4×4-token panel is the target


@pytest.mark.parametrize("inject_into", ["noisy", "condition"])
def test_zero_scale_adapter_leaves_the_model_unchanged(backbone, inject_into):
    none = Vis2IRModel(copy.deepcopy(backbone), SemanticConfig(mode="none"))
    xattn = Vis2IRModel(copy.deepcopy(backbone), SemanticConfig(mode="cross_attention", inject_into=inject_into))
    vis, ir, sem = batch()
    t, noise = torch.tensor([0.5, 0.5]), torch.randn(2, 32, 192)
    a, b = none(vis, ir, sem, t, noise), xattn(vis, ir, sem, t, noise)
    assert torch.allclose(a.pred, b.pred, atol=1e-6)
    # The scale is the one adapter parameter that gets a gradient at initialisation.
    (b.pred - b.target).square().mean().backward()
    layer = xattn.adapter.layers[0]
    assert layer.scale.grad.abs() > 0
    with torch.no_grad():
        layer.scale.fill_(1.0)
    c = xattn(vis, ir, sem, t, noise)
    assert not torch.allclose(a.pred, c.pred, atol=1e-4)


def test_return_attention(backbone):
    model = Vis2IRModel(copy.deepcopy(backbone), SemanticConfig(mode="cross_attention", num_layers=2, num_heads=4))
    vis, ir, sem = batch()
    enc = model.encode(vis, None, sem)
    v, attn = model.velocity(torch.randn(2, 32, 192), enc, torch.tensor([1.0]), return_attention=True)
    assert v.shape == (2, 32, 192) and len(attn) == 2 and attn[0].shape == (2, 4, 32, 32)


def test_startup_info_lines(backbone, caplog):
    caplog.set_level(logging.INFO, logger="vis2ir")
    Vis2IRModel(copy.deepcopy(backbone), SemanticConfig(mode="cross_attention", num_layers=3, num_heads=8))
    text = caplog.text
    assert "Semantic conditioning ENABLED" in text and "Semantic mode: cross_attention" in text
    assert "Using Cross-Attention with 3 layers, 8 heads" in text
    per_layer = 4 * (192 * 192 + 192) + 2 * 2 * 192 + 1
    assert f"{3 * per_layer} parameters ({per_layer} per layer)" in text


def test_in_channels_are_checked_against_the_codec(backbone, tiny_config):
    vae_backbone = load_backbone(tiny_config().model)  # transformer sized for the VAE codec
    vae_backbone.codec = backbone.codec                # … given the pixel codec
    with pytest.raises(Vis2IRError, match="the transformer takes 384 input channels, but mode none"):
        Vis2IRModel(vae_backbone, SemanticConfig(mode="none"))


def test_specification_shapes_at_512(tiny_config):
    """512×512 panels with the FLUX VAE layout: x_0 [B,2048,64], x_cond [B,2048,320], hidden 384."""
    model = Vis2IRModel(load_backbone(tiny_config().model), SemanticConfig(mode="cross_attention"))
    vis, ir, sem = batch(1, 512)
    enc = model.encode(vis, ir, sem)
    assert enc.x_0.shape == (1, 2048, 64) and enc.x_cond.shape == (1, 2048, 320)
    assert enc.semantic_tokens.shape == (1, 2048, 64)
    assert model.transformer.config.in_channels == 384
    assert model.adapter.layers[0].scale.item() == 0.0


@pytest.mark.parametrize("codec_kind", ["pixel", "vae"])
def test_encode_batch_matches_separate_encodes(codec_kind):
    """One codec call for canvas + masked canvas gives the two separate encodings; the semantic
    tokens repeat the panel's tokens across both halves (exactly `[semantic | semantic]` for the
    pixel codec, whose blocks do not see their neighbours)."""
    from diffusers import AutoencoderKL

    from vis2ir.latents import PixelCodec, VAECodec, encode_fill_condition, encode_images
    from vis2ir.model import encode_batch
    from vis2ir.semantic.modes import build_canvas

    torch.manual_seed(0)
    codec = PixelCodec(4) if codec_kind == "pixel" else VAECodec(AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval())
    vis, ir, sem = batch(size=32)
    cfg = SemanticConfig(mode="cross_attention")
    enc = encode_batch(codec, cfg, vis, ir, sem)
    canvas, mask = build_canvas("cross_attention", vis, ir, sem)
    x_cond, ids = encode_fill_condition(codec, canvas, mask)
    assert torch.allclose(enc.x_0, encode_images(codec, canvas)[0], atol=1e-5)
    assert torch.allclose(enc.x_cond, x_cond, atol=1e-5) and torch.equal(enc.img_ids, ids)
    rows, cols = (4, 8) if codec_kind == "pixel" else (2, 4)  # 32×64 canvas, 8 or 16 pixels a token
    left, right = enc.semantic_tokens.view(2, rows, 2, cols // 2, -1).unbind(2)  # the two halves
    assert torch.equal(left, right)
    if codec_kind == "pixel":
        assert torch.equal(enc.semantic_tokens, encode_images(codec, torch.cat([sem, sem], -1))[0])
    sampling = encode_batch(codec, cfg, vis, None, sem)
    assert sampling.x_0 is None and sampling.x_cond.shape == enc.x_cond.shape
