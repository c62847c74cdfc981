"""Sampling reproduces stock diffusers `FluxFillPipeline` for the same tiny components."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline
from PIL import Image

from vis2ir.backbone import (Backbone, base_in_channels, build_tiny_text_encoders, build_tiny_vae, build_transformer,
                             encode_prompt)
from vis2ir.config import SemanticConfig, load_config
from vis2ir.latents import VAECodec, token_width
from vis2ir.model import Vis2IRModel
from vis2ir.pipeline import Vis2IRPipeline
from vis2ir.sample import generate, get_schedule

from tests.conftest import TINY_MODEL

SIZE, STEPS, GUIDANCE, SEED = 32, 4, 3.5, 7


def flux_fill_scheduler():
    """FLUX.1-Fill-dev's scheduler configuration."""
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    cfg = load_config(None, [*TINY_MODEL, f"model.prompt_cache_dir={tmp_path_factory.mktemp('pc')}"])
    torch.manual_seed(0)
    vae = build_tiny_vae(cfg.model).eval()
    transformer = build_transformer(cfg.model, base_in_channels(VAECodec(vae)), token_width(VAECodec(vae))).eval()
    encoders = build_tiny_text_encoders(cfg.model)
    stock = FluxFillPipeline(scheduler=flux_fill_scheduler(), vae=vae, transformer=transformer, **encoders)
    stock.set_progress_bar_config(disable=True)
    prompt = encode_prompt(encoders, cfg.model.prompt, cfg.model.max_sequence_length)
    return cfg, stock, Backbone(transformer, VAECodec(vae), prompt)


def pictures(seed, count=2):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)) for _ in range(count)]


def stock_infrared(stock, cfg, visible: Image.Image, seed=SEED) -> torch.Tensor:
    """Stock FluxFillPipeline on the diptych [visible | black] with the right half masked: its right half."""
    canvas = Image.new("RGB", (2 * SIZE, SIZE))
    canvas.paste(visible, (0, 0))
    mask = Image.new("L", (2 * SIZE, SIZE))
    mask.paste(255, (SIZE, 0, 2 * SIZE, SIZE))
    out = stock(image=canvas, mask_image=mask, prompt=cfg.model.prompt, height=SIZE, width=2 * SIZE,
                num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=torch.Generator("cpu").manual_seed(seed),
                output_type="pt", max_sequence_length=cfg.model.max_sequence_length).images
    return out[0, :, :, SIZE:]


@pytest.mark.parametrize("steps, seq_len", [(1, 8), (4, 8), (28, 2048), (50, 4096)])
def test_schedule_is_the_schedulers(steps, seq_len):
    sched = flux_fill_scheduler()
    m = (1.15 - 0.5) / (4096 - 256)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=seq_len * m + (0.5 - m * 256))
    assert torch.equal(get_schedule(steps, seq_len), sched.sigmas)


def test_mode_none_equals_stock_flux_fill(parts):
    cfg, stock, backbone = parts
    pipe = Vis2IRPipeline(Vis2IRModel(backbone, SemanticConfig(mode="none")), cfg)
    visible = pictures(0)
    ours = pipe(visible, steps=STEPS, guidance=GUIDANCE, seed=SEED, batch_size=2, output_type="pt").images
    for image, mine in zip(visible, ours):
        reference = stock_infrared(stock, cfg, image)
        assert mine.shape == reference.shape == (3, SIZE, SIZE)
        assert torch.allclose(mine, reference, atol=2e-5), (mine - reference).abs().max()
    # The seed matters (the test is not trivially true), and the posterior sample of the masked canvas too.
    other = pipe(visible[0], steps=STEPS, guidance=GUIDANCE, seed=SEED + 1, output_type="pt").images[0]
    assert (other - ours[0]).abs().max() > 1e-2


def test_zero_adapter_scale_equals_stock_flux_fill(parts):
    cfg, stock, backbone = parts
    model = Vis2IRModel(backbone, SemanticConfig(mode="cross_attention", num_heads=4))
    torch.manual_seed(0)
    with torch.no_grad():  # a "trained" adapter: other weights, and a scale of 1
        for p in model.adapter.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        model.adapter.layers[0].scale.fill_(1.0)
    pipe = Vis2IRPipeline(model, cfg)
    visible, semantic = pictures(1, 1), pictures(2, 1)
    kwargs = dict(steps=STEPS, guidance=GUIDANCE, seed=SEED, output_type="pt")
    off = pipe(visible, semantic, adapter_scale=0.0, **kwargs).images[0]
    reference = stock_infrared(stock, cfg, visible[0])
    assert torch.allclose(off, reference, atol=2e-5), (off - reference).abs().max()
    on = pipe(visible, semantic, **kwargs).images[0]
    assert (on - reference).abs().max() > 1e-3
    # `sample.adapter_scale` is the default (`vis2ir evaluate ... sample.adapter_scale=0`: what the adapter adds)
    pipe.cfg.sample.adapter_scale = 0.0
    assert torch.equal(pipe(visible, semantic, **kwargs).images[0], off)
    assert torch.equal(pipe(visible, semantic, adapter_scale=1.0, **kwargs).images[0], on)


def test_an_image_does_not_depend_on_its_batch(parts):
    cfg, _, backbone = parts
    model = Vis2IRModel(backbone, SemanticConfig(mode="none"))
    x = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    together = generate(model, x, steps=2, guidance=1.0, seed=3)
    alone = generate(model, x[1:2], steps=2, guidance=1.0, seed=3)
    assert torch.allclose(together[1:2], alone, atol=1e-5)


def test_attention_is_averaged_over_the_steps(parts):
    cfg, _, backbone = parts
    model = Vis2IRModel(backbone, SemanticConfig(mode="cross_attention", num_layers=2, num_heads=4))
    x, sem = torch.rand(2, 1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    images, attention = generate(model, x, sem, steps=3, guidance=1.0, return_attention=True)
    n = (SIZE // 16) * (2 * SIZE // 16)
    assert images.shape == (1, 3, SIZE, SIZE) and len(attention) == 2
    assert attention[0].shape == (1, 4, n, n)
    assert torch.allclose(attention[0].sum(-1), torch.ones(1, 4, n), atol=1e-5)
