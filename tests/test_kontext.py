"""FLUX.1 Kontext as a backbone (`model.backbone: flux1-kontext`, issue 31): sampling equals stock diffusers
`FluxKontextPipeline` (no auto-resize, the photo's own size), training runs through the train loop, the LoRA a
run writes loads into the stock pipeline and gives the same images, and what is not supported yet is refused."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
from PIL import Image

from vis2ir.backbone import build_tiny_text_encoders
from vis2ir.checkpoint import list_checkpoints
from vis2ir.config import ConfigError
from vis2ir.errors import Vis2IRError
from vis2ir.latents import decode_tokens
from vis2ir.model import build_model
from vis2ir.pipeline import Vis2IRPipeline
from vis2ir.sample import generate
from vis2ir.train import train

KONTEXT = ["model.backbone=flux1-kontext", "model.semantic.mode=none", "train.loss_region=target"]


def kontext_scheduler():
    """FLUX.1's dynamic-shift scheduler (FLUX.1-Kontext-dev ships the same FlowMatchEuler configuration)."""
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)


def stock_pipeline(model, cfg):
    """Stock FluxKontextPipeline on the model's own transformer and VAE, with the tiny text encoders."""
    stock = FluxKontextPipeline(scheduler=kontext_scheduler(), vae=model.codec.vae, transformer=model.transformer,
                                **build_tiny_text_encoders(cfg.model))
    stock.set_progress_bar_config(disable=True)
    return stock


def picture(h, w, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def stock_run(stock, cfg, image, steps, guidance, seed):
    """Stock Kontext at the photo's own size: no auto-resize, `max_area` = H·W (its default snaps to ~1 MP)."""
    h, w = image.height, image.width
    return stock(image=image, prompt=cfg.model.prompt, height=h, width=w, max_area=h * w, _auto_resize=False,
                 num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed),
                 output_type="pt", max_sequence_length=cfg.model.max_sequence_length).images


@pytest.fixture
def kontext(tiny_config):
    cfg = tiny_config(*KONTEXT)
    model = build_model(cfg).eval()
    return cfg, model


@pytest.mark.parametrize("h, w, steps, guidance, seed", [(48, 64, 4, 2.5, 7), (64, 48, 2, 3.5, 3)])
def test_mode_none_equals_stock_flux_kontext(kontext, h, w, steps, guidance, seed):
    cfg, model = kontext
    stock = stock_pipeline(model, cfg)
    pipe = Vis2IRPipeline(model, cfg)
    image = picture(h, w, seed)
    ours = pipe(image, steps=steps, guidance=guidance, seed=seed, output_type="pt").images[0]
    theirs = stock_run(stock, cfg, image, steps, guidance, seed)[0]
    assert ours.shape == theirs.shape == (3, h, w)
    # At rounding tolerance: measured max|d| 9.5e-7 and 9.8e-7 (CPU, fp32); another seed moves it by about 1.
    assert torch.allclose(ours, theirs, atol=5e-6, rtol=0), (ours - theirs).abs().max()
    # Not trivially true: another seed and another photo change the image.
    other_seed = pipe(image, steps=steps, guidance=guidance, seed=seed + 1, output_type="pt").images[0]
    other_photo = pipe(picture(h, w, seed + 100), steps=steps, guidance=guidance, seed=seed, output_type="pt").images[0]
    assert (other_seed - ours).abs().max() > 1e-2 and (other_photo - ours).abs().max() > 1e-4


def test_reference_after_the_target_and_the_target_slice(kontext):
    """Target ids (0, r, c), reference ids (1, r, c) on the same grid; the prediction is the target slice."""
    cfg, model = kontext
    vis, ir = torch.rand(2, 3, 32, 48), torch.rand(2, 3, 32, 48)
    enc = model.encode(vis, ir)
    assert enc.x_0.shape == enc.context.shape == (2, 6, 64) and enc.x_cond.shape == (2, 6, 0)
    assert (enc.img_ids[:, 0] == 0).all() and (enc.context_ids[:, 0] == 1).all()
    assert torch.equal(enc.img_ids[:, 1:], enc.context_ids[:, 1:])
    pred, target = model(vis, ir, None, torch.full((2,), 0.5), encoded=enc)
    assert pred.shape == target.shape == (2, 6, 64)
    assert model.target_tokens(enc).all() and model.transformer.config.in_channels == 64
    # A training sample's sequence: target and reference tokens (as many as Fill's canvas of two panels).
    from vis2ir.train import training_tokens

    assert training_tokens(model, cfg)[0] == 2 * (cfg.data.size // 16) ** 2
    # The reference reaches the prediction: another photo, another v̂.
    other = model.velocity(enc.x_0, model.encode(torch.rand(2, 3, 32, 48), ir), torch.full((2,), 0.5))
    assert (other - model.velocity(enc.x_0, enc, torch.full((2,), 0.5))).abs().max() > 1e-4


TINY_RUN = [*KONTEXT, "model.lora.rank=4", "data.source=thermalscenes", "data.size=32", "data.synth_count=12",
            "data.val_fraction=0.2", "data.test_fraction=0.2", "data.num_workers=0", "train.batch_size=2",
            "train.learning_rate=1e-3", "train.checkpoint_every=2", "train.val_every=2", "train.val_batches=1",
            "train.log_every=1", "train.max_steps=2"]


def test_lora_a_run_writes_loads_into_stock_kontext(tiny_config, tmp_path):
    cfg = tiny_config(*TINY_RUN, "train.learning_rate=5e-2", f"train.output_dir={tmp_path / 'run'}")
    ckpt = train(cfg, progress=False) / "checkpoints" / "step-2"
    pipe = Vis2IRPipeline.from_checkpoint(ckpt, overrides=["sample.size=native"])  # the photo's own size
    base = build_model(cfg).eval()  # the same random base, without the LoRA
    stock = stock_pipeline(base, cfg)
    image = picture(32, 48, 1)
    before = stock_run(stock, cfg, image, 3, 2.5, 5)[0]
    stock.load_lora_weights(ckpt)
    after = stock_run(stock, cfg, image, 3, 2.5, 5)[0]
    ours = pipe(image, steps=3, guidance=2.5, seed=5, output_type="pt").images[0]
    assert torch.allclose(ours, after, atol=1e-5, rtol=0), (ours - after).abs().max()
    assert (after - before).abs().max() > 1e-4  # the LoRA trained and matters


@pytest.mark.parametrize("overrides, message", [
    (["model.semantic.mode=cross_attention"], "model.semantic.mode: expected none, pixel_fusion or channel_concat "
                                              "with model.backbone=flux1-kontext"),
    (["model.semantic.mode=in_context"], "(its other semantic modes are not yet supported), got 'in_context'"),
    (["train.loss_region=all"], "train.loss_region: expected target with model.backbone=flux1-kontext"),
    (["data.latent_cache=/tmp/cache"], "data.latent_cache: expected none with model.backbone=flux1-kontext"),
    (["model.weights=pretrained"], "model.flux_path: expected FLUX.1 Kontext weights"),
])
def test_what_is_not_supported_yet_is_refused_in_one_line(tiny_config, overrides, message):
    with pytest.raises(ConfigError) as err:
        tiny_config(*KONTEXT, *overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_fill_folder_is_refused_as_kontext(tiny_config, tmp_path):
    """A weights folder in FluxFillPipeline layout (transformer of 384 inputs) given for Kontext: one line."""
    fill = build_model(tiny_config())
    root = tmp_path / "fill"
    fill.transformer.save_pretrained(root / "transformer")
    fill.codec.vae.save_pretrained(root / "vae")
    encoders = build_tiny_text_encoders(tiny_config().model)
    for name, part in encoders.items():
        part.save_pretrained(root / name)
    with pytest.raises(Vis2IRError) as err:
        build_model(tiny_config(*KONTEXT, "model.weights=pretrained", f"model.flux_path={root}"))
    text = str(err.value)
    assert "takes 384 input channels (FLUX.1 Fill), but model.backbone=flux1-kontext takes 64" in text
    assert "\n" not in text


def test_init_from_a_fill_checkpoint_is_refused(tiny_config, tmp_path):
    run_dir = train(tiny_config(*TINY_RUN[1:3], *TINY_RUN[3:], "train.loss_region=target",
                                f"train.output_dir={tmp_path / 'fill'}"), progress=False)
    cfg = tiny_config(*TINY_RUN, f"train.init_from={run_dir}", f"train.output_dir={tmp_path / 'k'}")
    with pytest.raises(Vis2IRError) as err:
        train(cfg, progress=False)
    assert "model.backbone='flux1-kontext' differs from the checkpoint's 'flux1-fill'" in str(err.value)


def test_semantic_modes_start_as_stock(tiny_config):
    """channel_concat freshly widened (zero columns for the map's tokens on target and reference) and
    pixel_fusion at α = 0 sample what mode none samples; the map matters once the new columns are not zero."""
    vis, sem = torch.rand(1, 3, 32, 48), torch.rand(1, 3, 32, 48)
    none = generate(build_model(tiny_config(*KONTEXT)).eval(), vis, None, steps=2, guidance=2.5, seed=3)
    concat = build_model(tiny_config(*KONTEXT, "model.semantic.mode=channel_concat")).eval()
    assert concat.transformer.config.in_channels == 128
    assert torch.allclose(generate(concat, vis, sem, steps=2, guidance=2.5, seed=3), none, atol=1e-6)
    fusion = build_model(tiny_config(*KONTEXT, "model.semantic.mode=pixel_fusion", "model.semantic.fusion_alpha=0"))
    assert torch.allclose(generate(fusion.eval(), vis, sem, steps=2, guidance=2.5, seed=3), none, atol=1e-6)
    fused = build_model(tiny_config(*KONTEXT, "model.semantic.mode=pixel_fusion")).eval()  # α = 0.5
    assert (generate(fused, vis, sem, steps=2, guidance=2.5, seed=3) - none).abs().max() > 1e-4
    with torch.no_grad():
        concat.transformer.x_embedder.weight[:, 64:].normal_(0, 0.1)
    moved = generate(concat, vis, sem, steps=2, guidance=2.5, seed=3)
    assert (moved - none).abs().max() > 1e-4
    enc = concat.encode(vis, None, sem)
    assert enc.semantic_tokens.shape == enc.context.shape == (1, 6, 64)
    with pytest.raises(Vis2IRError, match="needs a semantic map for every image"):
        concat.encode(vis, None, None)


def test_channel_concat_trains(tiny_config, tmp_path):
    run_dir = train(tiny_config(*TINY_RUN, "model.semantic.mode=channel_concat", f"train.output_dir={tmp_path / 'r'}"),
                    progress=False)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-2"]


def test_the_pixel_codec_trains_and_generates(tiny_config, tmp_path):
    """Kontext on the exact pixel codec (the from-scratch models of docs/results.md): the reference's tokens are
    the photo's pixels exactly, on the target's grid; a run trains and its checkpoint generates."""
    cfg = tiny_config(*KONTEXT, "model.weights=random", "model.codec=pixel", "model.pixel_factor=4")
    model = build_model(cfg)
    photo = torch.rand(1, 3, 32, 48)
    encoded = model.encode(photo)
    assert encoded.context.shape == (1, 24, 192)  # (32/8) × (48/8) tokens of 2×2 patches of 4×4×3 pixels
    assert torch.equal(encoded.context_ids[:, 1:], encoded.img_ids[:, 1:]) and (encoded.context_ids[:, 0] == 1).all()
    assert torch.allclose(decode_tokens(model.codec, encoded.context, 32, 48), photo, atol=1e-6)  # exact
    run_dir = train(tiny_config(*TINY_RUN, "model.weights=random", "model.codec=pixel",
                                f"train.output_dir={tmp_path / 'r'}"), progress=False)
    pipe = Vis2IRPipeline.from_checkpoint(list_checkpoints(run_dir)[-1], "cpu", overrides=["sample.steps=2"])
    out = pipe(Image.new("RGB", (48, 32), (90, 120, 60)), output_type="pt").images[0]
    assert out.shape == (3, 32, 48) and torch.isfinite(out).all()


def test_generate_draws_noise_only(kontext):
    """Kontext draws the initial noise and nothing else from each image's generator (stock: the reference is
    the posterior mode), so the same seed gives the same image whatever the batch."""
    cfg, model = kontext
    vis = torch.rand(2, 3, 32, 32)
    both = generate(model, vis, steps=2, guidance=2.5, seed=3)
    one = generate(model, vis[1:], steps=2, guidance=2.5, seed=3)
    assert both.shape == (2, 3, 32, 32) and torch.allclose(both[1:], one, atol=1e-5)  # batch-size rounding


def test_step_cache_on_kontext(kontext, tiny_config):
    """`sample.cache=first_block` wraps the Kontext transformer too: a zero threshold computes every step (the
    exact sampler's images), a huge one only the first step (other images)."""
    from vis2ir.config import load_config
    from vis2ir.speedup import StepCache
    from tests.conftest import TINY_MODEL

    cfg, model = kontext
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.transformer.parameters():  # larger weights: outputs that move between steps
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    vis = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    exact = generate(model, vis, steps=4, guidance=2.5, seed=3)

    def cached(threshold):
        cache = StepCache.of(load_config(None, [*TINY_MODEL, "sample.cache=first_block",
                                                f"sample.cache_threshold={threshold}"]).sample)
        return generate(model, vis, steps=4, guidance=2.5, seed=3, cache=cache), cache

    every, counted = cached(0)
    assert (counted.computed, counted.total) == (4, 4) and torch.allclose(every, exact, atol=1e-6)
    lazy, counted = cached(1e9)
    assert (counted.computed, counted.total) == (1, 4) and (lazy - exact).abs().max() > 1e-5
