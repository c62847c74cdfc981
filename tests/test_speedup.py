"""Faster sampling: per-image work done once, no host tensors in the loop, step caches, compiled blocks."""

import functools
import weakref

import pytest
import torch
from torch import nn

from vis2ir.checkpoint import add_lora
from vis2ir.config import ConfigError, SampleConfig, load_config
from vis2ir.errors import Vis2IRError
from vis2ir.latents import token_width
from vis2ir.model import build_model
from vis2ir.pipeline import Vis2IRPipeline
from vis2ir.sample import decode_target, generate, get_noise, get_schedule, make_generators
import vis2ir.speedup
from vis2ir.speedup import (FUSED_AWAY, LinearGELU, StepCache, compile_blocks, fuse_for_sampling, fuse_gelu,
                             modulation_layers, modulation_table, per_step_modulation)

from tests.conftest import TINY_MODEL

SIZE, STEPS = 32, 4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("prompt_cache")


def model_for(cache_dir, *overrides):
    """A tiny model (pixel codec) whose adapter (if any) is 'trained': random weights and a scale of 1."""
    cfg = load_config(None, [*TINY_MODEL, f"model.prompt_cache_dir={cache_dir}", "model.codec=pixel",
                             "model.semantic.num_heads=4", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.transformer.parameters():  # larger weights: outputs that move between steps
            p.add_(torch.randn_like(p) * 0.05)
        if model.adapter is not None:
            for p in model.adapter.parameters():
                p.add_(torch.randn_like(p) * 0.5)
            model.adapter.layers[0].scale.fill_(1.0)
    return cfg, model


def inputs(batch=1):
    g = torch.Generator().manual_seed(3)
    return torch.rand(batch, 3, SIZE, SIZE, generator=g), torch.rand(batch, 3, SIZE, SIZE, generator=g)


@torch.no_grad()
def recomputing(model, visible, semantic, steps=STEPS, guidance=1.0, seed=0):
    """The sampler as it was: `model.velocity` (adapter, conditioning, RoPE) recomputed at every step."""
    generators = make_generators(seed, visible.shape[0])
    x = get_noise(model, generators, SIZE, 2 * SIZE)
    enc = model.encode(visible, None, semantic, generators)
    sigmas = get_schedule(steps, x.shape[1])
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        t = (sigma * 1000).expand(x.shape[0]).to(x.dtype) / 1000
        v = model.velocity(x, enc, t, guidance)
        x = (x.float() + (sigma_next - sigma) * v).to(v.dtype)
    return decode_target(model, x, enc)


def test_fusing_frees_each_layers_projections_before_the_next_layer_fuses(cache_dir, monkeypatch):
    """`fuse_for_sampling` layer by layer: when a layer fuses, the q/k/v weights the earlier layers dropped are
    freed (a list of every module kept them all alive until the end: +4 GiB at the peak on FLUX.1 Fill)."""
    _, model = model_for(cache_dir, "model.semantic.mode=none", "model.transformer.num_layers=2")
    attention_type = type(model.transformer.transformer_blocks[0].attn)
    dropped, alive = [], []
    fuse = attention_type.fuse_projections

    def watched(self):
        alive.append(sum(ref() is not None for ref in dropped))
        dropped.extend(weakref.ref(self._modules[name].weight) for name in FUSED_AWAY if name in self._modules)
        fuse(self)

    monkeypatch.setattr(attention_type, "fuse_projections", watched)
    assert fuse_for_sampling(model.transformer) == ["q/k/v projections fused in 3 attention layers",
                                                    "GELU applied inside 5 MLP input products"]
    assert len(alive) == 3 and len(dropped) == 2 * 6 + 3  # two double blocks, one single block
    assert alive == [0, 0, 0]
    assert all(ref() is None for ref in dropped)


def test_gelu_goes_inside_each_plain_mlp_input_product(cache_dir):
    """`fuse_gelu`: the double blocks' `ff.net[0]`/`ff_context.net[0]` and the single blocks' `proj_mlp` + `act_mlp`
    become one `LinearGELU` (sharing the weights) with the tanh GELU FLUX uses; the transformer's output is the
    same. A layer with a LoRA is left alone."""
    _, model = model_for(cache_dir, "model.semantic.mode=none")
    transformer = model.transformer
    double, single = transformer.transformer_blocks[0], transformer.single_transformer_blocks[0]
    weight = double.ff.net[0].proj.weight
    torch.manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, transformer.config.in_channels),
                  encoder_hidden_states=torch.randn(1, 4, transformer.config.joint_attention_dim),
                  pooled_projections=torch.randn(1, transformer.config.pooled_projection_dim),
                  timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3),
                  guidance=torch.tensor([30.0]) if transformer.config.guidance_embeds else None)
    with torch.no_grad():
        before = transformer(**inputs).sample
        assert fuse_gelu(transformer) == 2 * len(transformer.transformer_blocks) + len(
            transformer.single_transformer_blocks)
        after = transformer(**inputs).sample
    assert isinstance(double.ff.net[0], LinearGELU) and double.ff.net[0].weight is weight
    assert isinstance(single.proj_mlp, LinearGELU) and isinstance(single.act_mlp, torch.nn.Identity)
    assert torch.allclose(before, after, atol=1e-6), (before - after).abs().max()
    x = torch.randn(3, 5, double.ff.net[0].in_features)
    exact = torch.nn.functional.gelu(x @ weight.T + double.ff.net[0].bias)  # the erf GELU, not FLUX's
    assert (double.ff.net[0](x) - exact).abs().max() > 1e-5  # the tanh approximation is what runs

    cfg, with_lora = model_for(cache_dir, "model.semantic.mode=none")
    add_lora(with_lora.transformer, cfg.model.lora)  # the single blocks' proj_mlp is one of its targets
    assert fuse_gelu(with_lora.transformer) == 2 * len(transformer.transformer_blocks)
    assert not isinstance(with_lora.transformer.single_transformer_blocks[0].proj_mlp, LinearGELU)


@pytest.mark.parametrize("inject_into, calls", [("condition", 1), ("noisy", STEPS)])
def test_adapter_runs_once_per_image_on_the_condition(cache_dir, inject_into, calls, monkeypatch):
    # The modulation table's own rounding is its test's business (below): here the layers run per step.
    monkeypatch.setattr(vis2ir.speedup, "modulation_table", per_step_modulation)
    _, model = model_for(cache_dir, "model.semantic.mode=cross_attention", f"model.semantic.inject_into={inject_into}")
    visible, semantic = inputs(2)
    count = []
    handle = model.adapter.register_forward_hook(lambda *args: count.append(1))
    try:
        fast = generate(model, visible, semantic, steps=STEPS, guidance=1.0)
    finally:
        handle.remove()
    assert len(count) == calls  # one batch: once on the clean condition, at every step on x_t
    reference = recomputing(model, visible, semantic)
    assert torch.allclose(fast, reference, atol=1e-6), (fast - reference).abs().max()
    # The adapter matters here (the comparison is not trivially true).
    model.adapter.layers[0].scale.data.fill_(0.0)
    assert (recomputing(model, visible, semantic) - reference).abs().max() > 1e-3


def test_attention_on_the_condition_is_the_per_step_attention(cache_dir):
    _, model = model_for(cache_dir, "model.semantic.mode=cross_attention")
    visible, semantic = inputs()
    _, attention = generate(model, visible, semantic, steps=STEPS, guidance=1.0, return_attention=True)
    enc = model.encode(visible, None, semantic, make_generators(0, 1))
    x_t = torch.zeros(*enc.x_cond.shape[:2], token_width(model.codec))
    _, once = model.velocity(x_t, enc, torch.ones(1), return_attention=True)
    assert torch.allclose(attention[0], once[0], atol=1e-6)


def test_rope_table_is_computed_once_per_image(cache_dir, monkeypatch):
    _, model = model_for(cache_dir, "model.semantic.mode=channel_concat")
    FluxPosEmbed = type(model.transformer.pos_embed)
    calls = []
    original = FluxPosEmbed.forward
    monkeypatch.setattr(FluxPosEmbed, "forward", lambda self, ids: calls.append(1) or original(self, ids))
    generate(model, *inputs(), steps=STEPS, guidance=1.0)
    assert len(calls) == 1
    assert "forward" not in vars(model.transformer.pos_embed)  # restored after the loop
    generate(model, *inputs(), steps=STEPS, guidance=1.0)
    assert len(calls) == 2


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_modulation_runs_once_per_loop_for_every_step(cache_dir, guidance_embeds):
    """`speedup.modulation_table`: each adaLN modulation layer computes all steps' rows in one call per loop,
    the loop reads its step's row, the layers are given back afterwards, and the images stay those of the
    per-step computation (within rounding); with and without a guidance embedding."""
    _, model = model_for(cache_dir, "model.semantic.mode=channel_concat", "model.transformer.num_layers=2",
                         f"model.transformer.guidance_embeds={str(guidance_embeds).lower()}")
    layers = modulation_layers(model.transformer)
    assert len(layers) == 2 * 2 + 1 + 1  # norm1 and norm1_context of two double blocks, one single block, norm_out
    rows = []
    for m in layers:
        m.linear.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    visible, semantic = inputs(2)
    fast = generate(model, visible, semantic, steps=STEPS, guidance=1.0)
    assert rows == [STEPS * 2] * len(layers)  # once each, on all steps' rows of the batch of 2
    assert all(isinstance(m.linear, nn.Linear) for m in layers)  # given back after the loop
    rows.clear()
    reference = recomputing(model, visible, semantic)
    assert rows == [2] * (STEPS * len(layers))  # per step, the layers as diffusers runs them
    # Within float rounding: one product of steps·B rows rounds unlike B-row products (~1e-6 here).
    assert torch.allclose(fast, reference, atol=2e-5), (fast - reference).abs().max()
    # The modulation matters (the comparison is not trivially true).
    with torch.no_grad():
        layers[0].linear.weight.add_(0.5)
    assert (generate(model, visible, semantic, steps=STEPS, guidance=1.0) - fast).abs().max() > 1e-3


def test_modulation_rows_are_each_steps_and_each_images(cache_dir):
    """Each step's rows, for a batch whose images differ in guidance and pooled prompt (the table is step-major),
    equal what the layer computes from diffusers' temb for that step alone."""
    _, model = model_for(cache_dir, "model.semantic.mode=none")
    tr = model.transformer
    layers = modulation_layers(tr)
    originals = [m.linear for m in layers]
    timesteps = torch.tensor([1.0, 0.6, 0.25])
    guidance = torch.tensor([1.0, 3.5])
    pooled = torch.randn(2, model.pooled_prompt_embeds.shape[-1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), modulation_table(tr, timesteps, guidance, pooled) as at_step:
        for step, t in enumerate(timesteps):
            at_step(step)
            temb = tr.time_text_embed(t.expand(2) * 1000, guidance * 1000, pooled)  # as FluxTransformer2DModel
            for m, linear in zip(layers, originals):
                expected = linear(m.silu(temb))
                assert torch.allclose(m.linear(None), expected, atol=1e-6)
        assert (layers[0].linear(None)[0] - layers[0].linear(None)[1]).abs().max() > 1e-3  # the images differ


def test_modulation_table_stands_aside_when_the_weights_are_elsewhere(cache_dir):
    """Offloaded (weights on the CPU, inputs on the GPU) or sharded weights: no table, the layers run as usual."""
    _, model = model_for(cache_dir, "model.semantic.mode=none")
    pooled = model.pooled_prompt_embeds.to("meta")
    with modulation_table(model.transformer, torch.ones(STEPS, device="meta"), None, pooled) as at_step:
        at_step(0)
        assert all(isinstance(m.linear, nn.Linear) for m in modulation_layers(model.transformer))


def test_a_nested_loop_has_its_own_table_and_gives_the_outer_one_back(cache_dir):
    """A denoising loop inside another (e.g. a callback that samples) reads its own rows, not the outer loop's;
    the outer loop's table is back in place after it, and the layers after the outer loop."""
    _, model = model_for(cache_dir, "model.semantic.mode=none")
    visible, _ = inputs()
    alone = generate(model, visible, None, steps=STEPS, guidance=1.0)
    inner = []
    outer = generate(model, visible, None, steps=STEPS, guidance=3.0, callback=lambda done, steps: inner.append(
        generate(model, visible, None, steps=STEPS, guidance=1.0)) if done == 1 else None)
    assert torch.allclose(inner[0], alone, atol=2e-5), (inner[0] - alone).abs().max()
    assert (outer - alone).abs().max() > 1e-3  # another guidance: the inner loop would have read other rows
    assert torch.allclose(outer, generate(model, visible, None, steps=STEPS, guidance=3.0), atol=1e-6)
    assert all(isinstance(m.linear, nn.Linear) for m in modulation_layers(model.transformer))


def test_modulation_under_autocast_is_what_the_layers_compute(cache_dir):
    """Under autocast (training's validation grids in bf16-mixed) diffusers casts t and guidance to the hidden
    states' dtype — autocast's — before scaling them by 1000; the table does the same."""
    _, model = model_for(cache_dir, "model.semantic.mode=none")
    visible, _ = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = generate(model, visible, None, steps=STEPS, guidance=3.5)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(vis2ir.speedup, "modulation_table", per_step_modulation)
            reference = generate(model, visible, None, steps=STEPS, guidance=3.5)
    assert torch.allclose(fast, reference, atol=2e-5), (fast - reference).abs().max()  # before: 0.09 apart


def test_compiled_blocks_are_not_recompiled_for_another_number_of_steps(cache_dir, monkeypatch):
    """The table's rows enter the compiled blocks as ordinary inputs `[B, out]`: the number of steps does not
    (dynamo's eager backend: graphs are counted, nothing is built)."""
    from torch._dynamo.utils import counters

    _, model = model_for(cache_dir, "model.semantic.mode=none", "model.transformer.num_layers=1")
    compile_eagerly = functools.partial(torch.compile, backend="eager")
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: compile_eagerly(fn, **kw))
    torch._dynamo.reset()
    compile_blocks(model.transformer)
    visible, _ = inputs()
    generate(model, visible, None, steps=2, guidance=1.0)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2  # the double and the single block were compiled
    for steps in (3, 5, 7):
        generate(model, visible, None, steps=steps, guidance=1.0)
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


def watching(fn, offending: list, monkeypatch):
    """`fn`, recording in `offending` every host read-back or tensor built from host values while it runs."""
    def watched(*args, **kwargs):
        saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
        made = {name: getattr(torch, name) for name in ("tensor", "as_tensor", "from_numpy")}
        for name, f in saved.items():
            monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name, _f=f, **k: offending.append(_n) or _f(*a, **k))
        for name, f in made.items():
            monkeypatch.setattr(torch, name, lambda *a, _n=name, _f=f, **k: offending.append(_n) or _f(*a, **k))
        try:
            return fn(*args, **kwargs)
        finally:
            for name, f in saved.items():
                monkeypatch.setattr(torch.Tensor, name, f)
            for name, f in made.items():
                monkeypatch.setattr(torch, name, f)
    return watched


def test_sampling_step_builds_no_host_tensor_and_reads_nothing_back(cache_dir, monkeypatch):
    """Every step's tensors are made on the device and nothing is read back: on a GPU, a tensor built from
    host values or a read-back (`.item()`, `float(t)`, `if t:`) synchronises the host with the device."""
    _, model = model_for(cache_dir, "model.semantic.mode=cross_attention", "model.semantic.inject_into=noisy")
    offending = []
    monkeypatch.setattr(model, "predict", watching(model.predict, offending, monkeypatch))
    generate(model, *inputs(), steps=STEPS, guidance=1.0)
    assert offending == []
    watching(lambda: torch.as_tensor(1.0) + torch.ones(1).item(), offending, monkeypatch)()
    assert offending == ["as_tensor", "item"]  # the watch sees them


# ----------------------------------------------------------------------------------------------
# Step caches


def test_step_cache_is_off_by_default(cache_dir):
    assert SampleConfig().cache == "none" and StepCache.of(SampleConfig()) is None
    cfg, model = model_for(cache_dir, "model.semantic.mode=none")
    pipe = Vis2IRPipeline(model, cfg)
    pipe(inputs()[0][0], steps=2, output_type="pt")
    assert pipe.step_cache is None


def run(model, cfg, cache, *overrides, steps=6):
    settings = load_config(None, [*TINY_MODEL, f"sample.cache={cache}", *overrides]).sample
    step_cache = StepCache.of(settings)
    visible, semantic = inputs()
    out = generate(model, visible, semantic if model.mode != "none" else None, steps=steps, guidance=1.0,
                   cache=step_cache)
    assert not model.transformer.is_cache_enabled  # hooks removed after the loop
    return out, step_cache


@pytest.mark.parametrize("mode", ["none", "channel_concat", "cross_attention"])
def test_first_block_cache_skips_by_its_threshold(cache_dir, mode):
    cfg, model = model_for(cache_dir, f"model.semantic.mode={mode}")
    exact, _ = run(model, cfg, "none")
    every, counted = run(model, cfg, "first_block", "sample.cache_threshold=0")
    assert (counted.computed, counted.total) == (6, 6)
    assert torch.allclose(every, exact, atol=1e-6)
    lazy, counted = run(model, cfg, "first_block", "sample.cache_threshold=1e9")
    assert (counted.computed, counted.total) == (1, 6)  # only the first step runs every block
    assert (lazy - exact).abs().max() > 1e-5  # skipped work changes the samples (a little, in this tiny model)


def test_taylorseer_cache_computes_on_its_schedule(cache_dir):
    cfg, model = model_for(cache_dir, "model.semantic.mode=channel_concat")
    exact, _ = run(model, cfg, "none")
    every, counted = run(model, cfg, "taylorseer", "sample.cache_warmup=1", "sample.cache_interval=1")
    assert (counted.computed, counted.total) == (6, 6)
    assert torch.allclose(every, exact, atol=1e-6)
    sparse, counted = run(model, cfg, "taylorseer", "sample.cache_warmup=2", "sample.cache_interval=3")
    assert (counted.computed, counted.total) == (3, 6)  # steps 0, 1 (warm-up) and 3
    assert counted.skip_rate == 0.5
    assert (sparse - exact).abs().max() > 1e-5


def test_step_cache_through_the_pipeline_setting(cache_dir):
    cfg, model = model_for(cache_dir, "model.semantic.mode=none", "sample.cache=taylorseer", "sample.cache_warmup=1",
                           "sample.cache_interval=2")
    pipe = Vis2IRPipeline(model, cfg)
    pipe([inputs()[0][0]] * 2, steps=5, output_type="pt", batch_size=1)
    assert (pipe.step_cache.computed, pipe.step_cache.total) == (6, 10)  # 0, 2, 4 of each image's 5 steps
    assert pipe.step_cache.computed_at == [2, 0, 2, 0, 2]
    pipe(inputs()[0][0], steps=5, output_type="pt")  # the counts go on while the settings stay
    assert (pipe.step_cache.computed, pipe.step_cache.total) == (9, 15)
    pipe.cfg.sample.cache_interval = 1
    pipe(inputs()[0][0], steps=5, output_type="pt")
    assert (pipe.step_cache.computed, pipe.step_cache.total) == (5, 5)


def test_step_cache_on_an_unsupported_model_is_one_line():
    cache = StepCache(SampleConfig(cache="first_block"))
    with pytest.raises(Vis2IRError, match=r"^sample.cache=first_block needs a diffusers transformer .*Linear with 0"):
        with cache.active(nn.Linear(2, 2)):
            pass


def test_step_cache_with_an_old_diffusers_is_one_line(cache_dir, monkeypatch):
    import diffusers.hooks

    monkeypatch.delattr(diffusers.hooks, "TaylorSeerCacheConfig")
    cfg, model = model_for(cache_dir, "model.semantic.mode=none")
    with pytest.raises(Vis2IRError, match=r"^sample.cache=taylorseer needs diffusers' TaylorSeerCacheConfig, which "
                                          r"diffusers .* does not have; upgrade diffusers or set sample.cache=none$"):
        run(model, cfg, "taylorseer")
    assert not model.transformer.is_cache_enabled


@pytest.mark.parametrize("override, key", [("sample.cache=teacache", "sample.cache"),
                                           ("sample.cache_interval=0", "sample.cache_interval"),
                                           ("sample.cache_warmup=0", "sample.cache_warmup"),
                                           ("sample.cache_threshold=-1", "sample.cache_threshold"),
                                           ("sample.compile_mode=fast", "sample.compile_mode"),
                                           # CUDA graphs: one graph per block kind overwrites its last output
                                           ("sample.compile_mode=reduce-overhead", "sample.compile_mode"),
                                           ("sample.compile_mode=max-autotune", "sample.compile_mode")])
def test_bad_speed_settings_are_refused(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


# ----------------------------------------------------------------------------------------------
# Compiled blocks


def test_compiled_blocks_match_eager(cache_dir):
    """torch.compile with inductor (g++ is there on the CI machines), with and without a step cache."""
    cfg, model = model_for(cache_dir, "model.semantic.mode=channel_concat")
    exact, _ = run(model, cfg, "none", steps=3)
    cached, counted = run(model, cfg, "first_block", "sample.cache_threshold=1e9", steps=3)
    torch._dynamo.reset()
    assert compile_blocks(model.transformer) == 2
    assert compile_blocks(model.transformer) == 0  # once
    compiled, _ = run(model, cfg, "none", steps=3)
    assert torch.allclose(compiled, exact, atol=1e-4), (compiled - exact).abs().max()
    compiled_cached, counted_compiled = run(model, cfg, "first_block", "sample.cache_threshold=1e9", steps=3)
    assert counted_compiled.computed == counted.computed == 1
    assert torch.allclose(compiled_cached, cached, atol=1e-4)


def test_compile_setting_compiles_the_pipeline(cache_dir, caplog):
    cfg, model = model_for(cache_dir, "model.semantic.mode=none", "sample.compile=true")
    torch._dynamo.reset()
    with caplog.at_level("INFO", logger="vis2ir"):
        pipe = Vis2IRPipeline(model, cfg)
        pipe(inputs()[0][0], steps=2, output_type="pt")
    assert model.transformer._vis2ir_compiled == "default"
    assert "first batch, compilation included" in caplog.text


def test_compile_without_a_compiler_is_one_line(cache_dir, no_compiler):
    """sample.compile on a machine where inductor cannot build (here: no C++ compiler) → one line, not a traceback."""
    cfg, model = model_for(cache_dir, "model.semantic.mode=none", "sample.compile=true")
    pipe = Vis2IRPipeline(model, cfg)
    with pytest.raises(Vis2IRError) as err:
        pipe(inputs()[0][0], steps=2, output_type="pt")
    message = str(err.value)
    assert message.startswith("sample.compile: torch.compile could not compile") and "\n" not in message
    assert message.endswith("set sample.compile=false")


def test_compile_needs_block_lists():
    with pytest.raises(Vis2IRError, match=r"^sample.compile: the transformer \(Linear\) has none"):
        compile_blocks(nn.Linear(2, 2))
