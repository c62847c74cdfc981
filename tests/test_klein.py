"""FLUX.2 klein as a backbone (`model.backbone: flux2-klein`, issue 31): sampling equals stock diffusers
`Flux2KleinPipeline` (the photo as `image`, at its own size, with and without true CFG), training runs through the
train loop, the LoRA a run writes loads into the stock pipeline and gives the same images, and what is not
supported yet is refused in one line."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from PIL import Image

from vis2ir import klein
from vis2ir.checkpoint import list_checkpoints
from vis2ir.config import ConfigError
from vis2ir.errors import Vis2IRError
from vis2ir.model import build_model
from vis2ir.pipeline import Vis2IRPipeline
from vis2ir.sample import generate
from vis2ir.train import train

# A tiny klein: Qwen3 of 4 layers (hidden states 1, 2, 3 as 9, 18, 27 of 36) and width 48 / 3 = 16; 4 RoPE axes.
KLEIN = ["model.backbone=flux2-klein", "model.semantic.mode=none", "train.loss_region=target",
         "model.transformer.joint_attention_dim=48", "model.transformer.guidance_embeds=false",
         "model.transformer.axes_dims_rope=[4,4,4,4]", "model.text.num_layers=4", "sample.guidance=4"]


def klein_scheduler():
    """FLUX.2's scheduler: dynamic shifting, with the μ the pipeline computes (`compute_empirical_mu`)."""
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)


def stock_pipeline(model, cfg, distilled=False):
    """Stock Flux2KleinPipeline on the model's own transformer and VAE, with the tiny Qwen3 and tokenizer."""
    stock = Flux2KleinPipeline(scheduler=klein_scheduler(), vae=model.codec.vae, transformer=model.transformer,
                               is_distilled=distilled, **klein.build_tiny_text_encoder(cfg.model))
    stock.set_progress_bar_config(disable=True)
    return stock


def picture(h, w, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def stock_run(stock, cfg, image, steps, guidance, seed):
    """Stock klein at the photo's own size (sides multiples of 16, at least 64: its smallest input)."""
    return stock(image=image, prompt=cfg.model.prompt, height=image.height, width=image.width,
                 num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed),
                 output_type="pt", max_sequence_length=cfg.model.max_sequence_length,
                 text_encoder_out_layers=klein.hidden_layers(cfg.model.text.num_layers)).images


@pytest.fixture
def tiny_klein(tiny_config):
    cfg = tiny_config(*KLEIN)
    return cfg, build_model(cfg).eval()


@pytest.mark.parametrize("h, w, steps, guidance, seed", [(64, 96, 4, 1.0, 7), (96, 64, 3, 4.0, 3)])
def test_mode_none_equals_stock_flux2_klein(tiny_klein, h, w, steps, guidance, seed):
    """Guidance 1: one pass per step; guidance 4 on a checkpoint that is not distilled: true CFG against the
    empty prompt, two passes per step."""
    cfg, model = tiny_klein
    stock = stock_pipeline(model, cfg)
    pipe = Vis2IRPipeline(model, cfg)
    image = picture(h, w, seed)
    ours = pipe(image, steps=steps, guidance=guidance, seed=seed, output_type="pt").images[0]
    theirs = stock_run(stock, cfg, image, steps, guidance, seed)[0]
    assert ours.shape == theirs.shape == (3, h, w)
    # At rounding tolerance (measured: equal, max|d| = 0, CPU fp32); another seed moves the image by about 1.
    assert torch.allclose(ours, theirs, atol=5e-6, rtol=0), (ours - theirs).abs().max()
    other_seed = pipe(image, steps=steps, guidance=guidance, seed=seed + 1, output_type="pt").images[0]
    other_photo = pipe(picture(h, w, seed + 100), steps=steps, guidance=guidance, seed=seed, output_type="pt").images[0]
    assert (other_seed - ours).abs().max() > 1e-2 and (other_photo - ours).abs().max() > 1e-4


def test_guidance_runs_true_cfg_unless_distilled(tiny_klein):
    """Guidance > 1 changes the image (true CFG); a distilled checkpoint ignores it, as stock does."""
    cfg, model = tiny_klein
    vis = torch.rand(1, 3, 32, 48)
    one = generate(model, vis, steps=2, guidance=1.0, seed=3)
    four = generate(model, vis, steps=2, guidance=4.0, seed=3)
    assert (four - one).abs().max() > 1e-3
    model.distilled = True
    assert torch.equal(generate(model, vis, steps=2, guidance=4.0, seed=3), one)


def test_tokens_ids_and_normalisation(tiny_klein):
    """Target ids (0, r, c, 0), reference ids (10, r, c, 0), prompt ids (0, 0, 0, l); the tokens are the VAE's
    posterior mode patchified 2×2 and normalised by its batch-norm statistics; the prediction is the target slice."""
    cfg, model = tiny_klein
    vis, ir = torch.rand(2, 3, 32, 48), torch.rand(2, 3, 32, 48)
    enc = model.encode(vis, ir)
    assert enc.x_0.shape == enc.context.shape == (2, 6, 64) and enc.img_ids.shape == (6, 4)
    assert (enc.img_ids[:, 0] == 0).all() and (enc.context_ids[:, 0] == 10).all()
    assert torch.equal(enc.img_ids[:, 1:], enc.context_ids[:, 1:]) and (enc.img_ids[:, 3] == 0).all()
    assert torch.equal(model.conditioning(enc).txt_ids[:, 3], torch.arange(8.0))
    vae = model.codec.vae
    z = Flux2KleinPipeline._patchify_latents(vae.encode(ir * 2 - 1).latent_dist.mode())
    z = (z - vae.bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + 1e-4)
    # rounding: the encode here reads an NCHW tensor, ours the channels-last layout stock's image processor makes
    assert torch.allclose(enc.x_0, Flux2KleinPipeline._pack_latents(z), atol=1e-5)
    assert vae.bn.running_var.std() > 0.1  # the tiny VAE's statistics are not the identity
    pred, target = model(vis, ir, None, torch.full((2,), 0.5), encoded=enc)
    assert pred.shape == target.shape == (2, 6, 64)


def test_schedule_shift_follows_the_step_count():
    """μ = compute_empirical_mu(N, steps), diffusers' own function, and it moves with the steps."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    for n, steps in [(24, 4), (1024, 28), (5000, 50)]:
        assert klein.empirical_mu(n, steps) == compute_empirical_mu(n, steps)
    assert klein.empirical_mu(1024, 4) != klein.empirical_mu(1024, 50)


def test_lora_targets_are_kleins(tiny_klein):
    """Default LoRA targets: diffusers' klein trainer's (double blocks' image attention, single blocks' fused
    projections), not ICEdit's, which name none of the single blocks' modules."""
    from vis2ir.checkpoint import add_lora

    cfg, model = tiny_klein
    add_lora(model.transformer, cfg.model.lora)
    names = {n.rsplit(".lora_A", 1)[0] for n, _ in model.transformer.named_parameters() if ".lora_A" in n}
    assert names == {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                     "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.to_out.0",
                     "single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out"}


TINY_RUN = [*KLEIN, "model.lora.rank=4", "data.source=thermalscenes", "data.size=32", "data.synth_count=12",
            "data.val_fraction=0.2", "data.test_fraction=0.2", "data.num_workers=0", "train.batch_size=2",
            "train.learning_rate=1e-3", "train.checkpoint_every=2", "train.val_every=2", "train.val_batches=1",
            "train.log_every=1", "train.max_steps=2"]


def test_lora_a_run_writes_loads_into_stock_klein(tiny_config, tmp_path):
    cfg = tiny_config(*TINY_RUN, "train.learning_rate=5e-2", f"train.output_dir={tmp_path / 'run'}")
    ckpt = train(cfg, progress=False) / "checkpoints" / "step-2"
    pipe = Vis2IRPipeline.from_checkpoint(ckpt, overrides=["sample.size=native"])  # the photo's own size
    base = build_model(cfg).eval()  # the same random base, without the LoRA
    stock = stock_pipeline(base, cfg)
    image = picture(64, 96, 1)
    before = stock_run(stock, cfg, image, 3, 2.5, 5)[0]
    stock.load_lora_weights(ckpt)
    after = stock_run(stock, cfg, image, 3, 2.5, 5)[0]
    ours = pipe(image, steps=3, guidance=2.5, seed=5, output_type="pt").images[0]
    assert torch.allclose(ours, after, atol=1e-5, rtol=0), (ours - after).abs().max()
    assert (after - before).abs().max() > 1e-4  # the LoRA trained and matters


def test_pixel_fusion_starts_as_stock(tiny_config):
    """pixel_fusion at α = 0 samples what mode none samples; at α = 0.5 the map moves the image; a missing map is
    one line."""
    vis, sem = torch.rand(1, 3, 32, 48), torch.rand(1, 3, 32, 48)
    none = generate(build_model(tiny_config(*KLEIN)).eval(), vis, None, steps=2, guidance=1.0, seed=3)
    fusion = build_model(tiny_config(*KLEIN, "model.semantic.mode=pixel_fusion", "model.semantic.fusion_alpha=0"))
    assert torch.allclose(generate(fusion.eval(), vis, sem, steps=2, guidance=1.0, seed=3), none, atol=1e-6)
    fused = build_model(tiny_config(*KLEIN, "model.semantic.mode=pixel_fusion")).eval()  # α = 0.5
    assert (generate(fused, vis, sem, steps=2, guidance=1.0, seed=3) - none).abs().max() > 1e-4
    with pytest.raises(Vis2IRError, match="needs a semantic map for every image"):
        fused.encode(vis, None, None)


def test_speed_ups_on_klein(tiny_klein, tiny_config):
    """Fusing the q/k/v projections is exact on FLUX.2's attention; the TaylorSeer step cache computes only some
    steps (approximate); RoPE is computed per call (FLUX.2 calls its pos_embed for image and text ids)."""
    from vis2ir.speedup import StepCache, fuse_for_sampling

    cfg, model = tiny_klein
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.transformer.parameters():  # larger weights: outputs that move between steps
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    vis = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    exact = generate(model, vis, steps=4, guidance=1.0, seed=3)
    cache = StepCache.of(tiny_config(*KLEIN, "sample.guidance=1", "sample.cache=taylorseer", "sample.cache_warmup=2",
                                     "sample.cache_interval=3").sample)
    lazy = generate(model, vis, steps=4, guidance=1.0, seed=3, cache=cache)
    assert cache.computed < cache.total == 4 and (lazy - exact).abs().max() > 1e-5
    with pytest.raises(Vis2IRError, match="a step cache does not yet follow true CFG's two passes"):
        generate(model, vis, steps=4, guidance=4.0, seed=3, cache=cache)
    assert fuse_for_sampling(model.transformer)  # something was fused
    assert torch.allclose(generate(model, vis, steps=4, guidance=1.0, seed=3), exact, atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["model.semantic.mode=cross_attention"],
     "model.semantic.mode: expected none, pixel_fusion or channel_concat with model.backbone=flux2-klein"),
    (["model.semantic.mode=in_context"], "(its other semantic modes are not yet supported), got 'in_context'"),
    (["train.loss_region=all"], "train.loss_region: expected target with model.backbone=flux2-klein"),
    (["data.latent_cache=/tmp/cache"], "data.latent_cache: expected none with model.backbone=flux2-klein"),
    (["model.codec=pixel"], "model.codec: expected vae with model.backbone=flux2-klein"),
    (["model.weights=pretrained"], "model.flux_path: expected FLUX.2 klein weights"),
    (["model.weights=pretrained", "model.flux_path=black-forest-labs/FLUX.1-Kontext-dev"],
     "model.flux_path: expected FLUX.2 klein weights"),
    (["model.transformer.guidance_embeds=true"], "model.transformer.guidance_embeds: expected false"),
    (["model.transformer.joint_attention_dim=32"], "model.transformer.joint_attention_dim: expected a multiple of 3"),
    (["model.transformer.axes_dims_rope=[4,6,6]"], "model.transformer.axes_dims_rope: expected four even numbers"),
    (["train.guidance=3.5"], "train.guidance: expected 1 with model.backbone=flux2-klein"),
    (["sample.cache=first_block"], "sample.cache: expected none or taylorseer with model.backbone=flux2-klein"),
    (["sample.guidance=50"], "sample.guidance: expected at most 10 with model.backbone=flux2-klein"),
    (["sample.cache=taylorseer"], "sample.cache: expected none with model.backbone=flux2-klein and sample.guidance > 1"),
])
def test_what_is_not_supported_yet_is_refused_in_one_line(tiny_config, overrides, message):
    with pytest.raises(ConfigError) as err:
        tiny_config(*KLEIN, *overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_flux1_folder_is_refused_as_klein(tiny_config, tmp_path):
    """A weights folder in FluxKontextPipeline layout given for klein: one line, before its VAE is read."""
    from vis2ir.backbone import build_tiny_text_encoders

    kontext_cfg = tiny_config("model.backbone=flux1-kontext", "model.semantic.mode=none", "train.loss_region=target")
    kontext = build_model(kontext_cfg)
    root = tmp_path / "kontext"
    kontext.transformer.save_pretrained(root / "transformer")
    kontext.codec.vae.save_pretrained(root / "vae")
    for name, part in build_tiny_text_encoders(kontext_cfg.model).items():
        part.save_pretrained(root / name)
    with pytest.raises(Vis2IRError) as err:
        build_model(tiny_config(*KLEIN, "model.weights=pretrained", f"model.flux_path={root}"))
    text = str(err.value)
    assert "its transformer is a FluxTransformer2DModel, but model.backbone=flux2-klein takes a " \
           "Flux2Transformer2DModel" in text and "\n" not in text


def test_pretrained_loads_a_klein_folder(tiny_klein, tiny_config, tmp_path):
    """`model.weights: pretrained` reads a folder in Flux2KleinPipeline layout (what `save_pretrained` writes) and
    samples what the model it was saved from samples; `is_distilled` in model_index.json is read."""
    cfg, model = tiny_klein
    root = tmp_path / "klein"
    stock_pipeline(model, cfg, distilled=True).save_pretrained(root)
    loaded = build_model(tiny_config(*KLEIN, "model.weights=pretrained", f"model.flux_path={root}",
                                     f"model.prompt_cache_dir={tmp_path / 'pc2'}")).eval()
    assert loaded.distilled and not model.distilled
    assert all(torch.equal(a, b) for a, b in zip(loaded.transformer.state_dict().values(),
                                                 model.transformer.state_dict().values()))
    # A loaded Qwen3 runs in bf16 (as FLUX.1's T5): its embeddings move by ~4e-4 (measured), the images by ~2e-5.
    assert torch.allclose(loaded.prompt_embeds, model.prompt_embeds, atol=2e-3)
    vis = torch.rand(1, 3, 32, 48)
    assert torch.allclose(generate(loaded, vis, steps=2, guidance=1.0, seed=3),
                          generate(model, vis, steps=2, guidance=1.0, seed=3), atol=2e-4)


def test_init_from_a_kontext_checkpoint_is_refused(tiny_config, tmp_path):
    """A LoRA base of another backbone (FLUX.1 Kontext's transformer under a klein run): one line, before loading."""
    kontext = ["model.backbone=flux1-kontext", "model.semantic.mode=none", "train.loss_region=target"]
    run_dir = train(tiny_config(*kontext, *TINY_RUN[len(KLEIN):], f"train.output_dir={tmp_path / 'kontext'}"),
                    progress=False)
    cfg = tiny_config(*TINY_RUN, f"train.init_from={run_dir}", f"train.output_dir={tmp_path / 'k'}")
    with pytest.raises(Vis2IRError) as err:
        train(cfg, progress=False)
    assert "model.backbone='flux2-klein' differs from the checkpoint's 'flux1-kontext'" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("mode", ["pixel_fusion", "channel_concat"])
def test_semantic_modes_train(tiny_config, tmp_path, mode):
    run_dir = train(tiny_config(*TINY_RUN, f"model.semantic.mode={mode}", f"train.output_dir={tmp_path / 'r'}"),
                    progress=False)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-2"]


def test_channel_concat_starts_as_stock(tiny_config):
    """channel_concat freshly widened (zero columns for the map's tokens on target and reference) samples what
    mode none samples; the map matters once the new columns are not zero; its LoRA targets add the x_embedder."""
    vis, sem = torch.rand(1, 3, 32, 48), torch.rand(1, 3, 32, 48)
    none = generate(build_model(tiny_config(*KLEIN)).eval(), vis, None, steps=2, guidance=1.0, seed=3)
    cfg = tiny_config(*KLEIN, "model.semantic.mode=channel_concat")
    concat = build_model(cfg).eval()
    assert concat.transformer.config.in_channels == 128 and cfg.model.lora.target_modules.startswith("(x_embedder|")
    assert torch.allclose(generate(concat, vis, sem, steps=2, guidance=1.0, seed=3), none, atol=1e-6)
    with torch.no_grad():
        concat.transformer.x_embedder.weight[:, 64:].normal_(0, 0.1)
    assert (generate(concat, vis, sem, steps=2, guidance=1.0, seed=3) - none).abs().max() > 1e-4
    enc = concat.encode(vis, None, sem)
    assert enc.semantic_tokens.shape == enc.context.shape == (1, 6, 64)
    with pytest.raises(Vis2IRError, match="needs a semantic map for every image"):
        concat.encode(vis, None, None)
