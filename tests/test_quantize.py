"""`model.quantize`: the frozen base's blocks in float8 (`Float8Linear`) or NF4 (bitsandbytes), LoRA on top.

Everything here runs on the CPU (bitsandbytes supports it for these layers, and PyTorch's `_scaled_mm` runs
float8 products there too); the GPU figures are in docs/performance.md.
"""

import sys

import pytest
import torch
from PIL import Image
from torch import nn

from vis2ir.checkpoint import LORA_FILE, add_lora, load_model, save_weights
from vis2ir.config import ConfigError
from vis2ir.errors import Vis2IRError
from vis2ir.model import build_model
from vis2ir.quantize import OutOfMemory, blocks, out_of_memory, require, weight_bytes
from vis2ir.speedup import fuse_gelu
from vis2ir.train import train

from tests.conftest import stock_pipeline_outputs

pytest.importorskip("bitsandbytes")

LAYER_TYPES = {"fp8": "Float8Linear", "nf4": "Linear4bit"}
# 64 wide: bitsandbytes' CPU kernel packs rows in blocks of 64 (FLUX's layers are 3072 wide).
WIDTH_64 = ("model.transformer.attention_head_dim=32", "model.transformer.axes_dims_rope=[8,12,12]")


def quantized(tiny_config, how, *overrides):
    cfg = tiny_config("model.semantic.mode=none", "model.dtype=bfloat16", "model.lora.rank=4",
                      f"model.quantize={how}", *WIDTH_64, *overrides)
    return cfg, build_model(cfg)


def velocity(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    vis, ir = torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g)
    noise = torch.randn(1, 8, 64, generator=g)
    with torch.no_grad():
        return model(vis, ir, None, torch.tensor([0.5]), noise).pred.float()


@pytest.mark.parametrize("how,max_error", [("fp8", 0.08), ("nf4", 0.3)])
def test_blocks_are_quantized_and_the_rest_kept(tiny_config, how, max_error):
    _, base = quantized(tiny_config, "none")
    _, model = quantized(tiny_config, how)
    linears = [m for b in blocks(model.transformer) for m in b.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m).__name__ == LAYER_TYPES[how] for m in linears)
    assert type(model.transformer.x_embedder) is nn.Linear  # widened by channel_concat: never quantized
    assert type(model.transformer.proj_out) is nn.Linear
    block_bytes = lambda m: sum(weight_bytes(b) for b in blocks(m.transformer))  # noqa: E731
    assert block_bytes(model) < 0.65 * block_bytes(base)
    v0, v1 = velocity(base), velocity(model)
    error = ((v1 - v0).norm() / v0.norm()).item()
    assert 0 < error < max_error  # quantized (not equal), yet the same model


@pytest.mark.parametrize("how", ["fp8", "nf4"])
def test_lora_trains_on_a_quantized_base_and_loads_into_the_stock_pipeline(tiny_config, tmp_path, how):
    """QLoRA: gradients reach LoRA only; the exported LoRA (diffusers layout) loads into an
    unquantized stock FluxFillPipeline and changes it as it changes our quantized model."""
    cfg, model = quantized(tiny_config, how)
    torch.manual_seed(0)  # peft draws the LoRA's A from the global RNG: the same LoRA in every run
    add_lora(model.transformer, cfg.model.lora)
    lora = [p for n, p in model.transformer.named_parameters() if "lora_" in n]
    for p in lora:
        p.data = p.data.float()
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(lora, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    vis, ir = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    for _ in range(3):
        pred, target = model(vis, ir, None, torch.tensor([0.3, 0.7]), torch.randn(2, 8, 64, generator=g))
        loss = (pred.float() - target.float()).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None for n, p in model.transformer.named_parameters() if "lora_" not in n)
    assert any(p.abs().sum() > 0 for n, p in model.transformer.named_parameters() if "lora_B" in n)

    save_weights(tmp_path / "ckpt", model, cfg)
    assert (tmp_path / "ckpt" / LORA_FILE).exists()
    plain = tiny_config("model.semantic.mode=none", "model.dtype=float32", "model.lora.rank=4", *WIDTH_64)
    before, after = stock_pipeline_outputs(build_model(plain).transformer, tmp_path / "ckpt")
    assert (after - before).abs().max() > 1e-3  # the trained LoRA changed the stock model
    # and our checkpoint loads back onto a quantized base
    loaded, loaded_cfg = load_model(tmp_path / "ckpt")
    assert loaded_cfg.model.quantize == how
    v_loaded, v_trained = velocity(loaded), velocity(model.eval())  # LoRA back in bf16, the model's dtype
    assert ((v_loaded - v_trained).norm() / v_trained.norm()).item() < 0.02


def test_missing_library_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(Vis2IRError) as err:
        require("nf4")
    message = str(err.value)
    assert "\n" not in message and "pip install 'bitsandbytes>=" in message and "model.quantize=none" in message
    require("none")  # needs nothing


def test_quantize_setting_is_checked(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="model.quantize.*not allowed"):
        tiny_config("model.quantize=int3")
    with pytest.raises(Vis2IRError, match="model.quantize=fp8 .* train.finetune=lora only"):
        train(tiny_config("model.quantize=fp8", "train.finetune=full", f"train.output_dir={tmp_path / 'run'}"))
    assert not (tmp_path / "run").exists()


def test_quantized_training_runs_and_a_full_checkpoint_can_be_sampled_quantized(tiny_config, tmp_path):
    """`vis2ir train` with model.quantize (LoRA on the quantized base), and a full-weights checkpoint
    (like the shipped demo model) loaded in full precision, then quantized."""
    run = ("data.size=32", "data.synth_count=24", "data.val_fraction=0.2", "data.test_fraction=0.2", "data.num_workers=0", "train.batch_size=2",
           "train.max_steps=2", "train.checkpoint_every=2", "train.val_every=100", "train.log_every=1")
    full_run = train(tiny_config(*WIDTH_64, *run, "model.semantic.mode=none", "train.finetune=full",
                                 f"train.output_dir={tmp_path / 'full'}"), progress=False)
    qlora_run = train(tiny_config(*WIDTH_64, *run, "model.semantic.mode=none", "model.quantize=nf4",
                                  f"train.init_from={full_run}", f"train.output_dir={tmp_path / 'qlora'}"),
                      progress=False)
    assert (qlora_run / "checkpoints" / "step-2" / LORA_FILE).exists()
    plain, _ = load_model(full_run)
    for how, max_error in (("fp8", 0.08), ("nf4", 0.3)):
        model, cfg = load_model(full_run, overrides=[f"model.quantize={how}"])
        assert cfg.model.quantize == how
        assert type(blocks(model.transformer)[0].attn.to_q).__name__ == LAYER_TYPES[how]
        v0, v1 = velocity(plain), velocity(model)
        assert 0 < ((v1 - v0).norm() / v0.norm()).item() < max_error


@pytest.mark.parametrize("how", ["none", "fp8"])
def test_empty_real_size_style_build_is_filled_then_quantized(tiny_config, how):
    """`model.transformer.init=normal` (the benchmarks' real-size build): empty weights, filled with
    N(0, 0.02) block by block on the device, quantized on the way."""
    _, model = quantized(tiny_config, how, "model.transformer.init=normal")
    plain = [p for p in model.transformer.parameters() if p.dtype != torch.float8_e4m3fn]
    assert plain and not any(p.is_meta for p in model.transformer.parameters())
    float8 = [m.weight.float() * m.weight_scale[:, None] for m in model.transformer.modules() if hasattr(m, "weight_scale")]
    assert bool(float8) == (how == "fp8")
    for values in (torch.cat([p.detach().float().flatten() for p in plain]), *(w.flatten() for w in float8)):
        assert torch.isfinite(values).all() and abs(values.std().item() - 0.02) < 0.002
    assert torch.isfinite(velocity(model)).all()


def test_out_of_memory_is_one_line_with_what_fits(tiny_config, tmp_path, monkeypatch):
    """An out-of-memory error in generation or training is one line naming the settings that use less
    and their measured peaks, not a traceback; `generate` stops at the first one."""
    import vis2ir.pipeline as pipeline
    import vis2ir.train as training
    from vis2ir.cli import main
    from vis2ir.quantize import MEASURED_PEAK_GIB

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipeline, "generate", no_memory)
    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(3):
        Image.new("RGB", (32, 32), (40 * k, 90, 120)).save(photos / f"{k}.png")
    cfg = tiny_config("model.semantic.mode=none")
    config = tmp_path / "c.yaml"
    cfg.save(config)
    calls = []
    monkeypatch.setattr(pipeline, "out_of_memory", lambda *a: calls.append(a) or out_of_memory(*a))
    assert main(["generate", "--config", str(config), "--input", str(photos), "--out", str(tmp_path / "ir")]) == 2
    assert len(calls) == 1 and not (tmp_path / "ir" / "0.png").exists()
    message = str(out_of_memory("generation", cfg))
    assert "\n" not in message and "model.quantize=fp8 or nf4" in message and "--offload sequential" in message
    assert f"nf4 {MEASURED_PEAK_GIB['generation']['nf4']:g} GiB" in message

    monkeypatch.setattr(training.Vis2IRModule, "training_step", no_memory)
    run_cfg = tiny_config("model.codec=pixel", "model.semantic.mode=none", "data.size=32", "data.synth_count=24",
                          "data.val_fraction=0.2", "data.test_fraction=0.2", "data.num_workers=0",
                          "train.max_steps=2", f"train.output_dir={tmp_path / 'run'}")
    with pytest.raises(OutOfMemory) as err:
        train(run_cfg, progress=False)
    assert "\n" not in str(err.value) and "train.batch_size=1" in str(err.value)
    assert "now model.quantize=none, train.batch_size=4" in str(err.value)


def test_vae_tiling_setting_reaches_the_vae(tiny_config):
    from vis2ir.pipeline import Vis2IRPipeline

    assert not Vis2IRPipeline.from_config(tiny_config()).model.codec.vae.use_tiling
    assert Vis2IRPipeline.from_config(tiny_config("sample.vae_tiling=true")).model.codec.vae.use_tiling


@pytest.mark.parametrize("how", ["fp8", "nf4"])
def test_a_pipeline_leaves_a_quantized_base_and_its_lora_unfused(tiny_config, tmp_path, how):
    """`sample.fuse` (on by default) skips a quantized base: merging the LoRA into, or concatenating, quantized
    weights breaks sampling. The pipeline keeps the LoRA beside the quantized to_q/to_k/to_v and samples."""
    from vis2ir.pipeline import Vis2IRPipeline

    cfg, model = quantized(tiny_config, how, "data.size=32")  # the 32-pixel image is sampled at 32, not 512
    add_lora(model.transformer, cfg.model.lora)
    save_weights(tmp_path / "ckpt", model, cfg)
    pipe = Vis2IRPipeline.from_checkpoint(tmp_path / "ckpt", device="cpu", overrides=["sample.steps=2"])
    assert pipe.cfg.sample.fuse
    attention = blocks(pipe.model.transformer)[0].attn
    assert not getattr(attention, "fused_projections", False) and not hasattr(attention, "to_qkv")
    assert type(attention.to_q.base_layer).__name__ == LAYER_TYPES[how]  # LoRA still beside the base
    _, bare = quantized(tiny_config, how)  # called directly, fuse_gelu too leaves quantized layers alone
    assert fuse_gelu(bare.transformer) == 0
    image = pipe(Image.new("RGB", (32, 32), (90, 120, 60)), output_type="pt").images[0]
    assert torch.isfinite(image).all()


# ----------------------------------------------------------------------------------------------
# Float8Linear: float8 weights, float8 products (PyTorch's `_scaled_mm` runs them on the CPU too)


def test_float8_rows_round_trip_within_e4m3_rounding():
    from vis2ir.quantize import FLOAT8, to_float8_rows

    x = torch.randn(5, 64) * torch.logspace(-3, 3, 5)[:, None]  # rows six decades apart: one scale each
    x[2] = 0  # an all-zero row: zeros, not NaN
    x8, scale = to_float8_rows(x)
    assert x8.dtype == FLOAT8 and scale.shape == (5, 1) and scale.dtype == torch.float32
    back = x8.float() * scale
    assert torch.equal(back[2], torch.zeros(64))
    big = x.abs() > 0.05 * x.abs().amax(dim=1, keepdim=True)  # e4m3's 3 mantissa bits: 2^-4 relative
    assert ((back - x).abs()[big] <= 2**-4 * x.abs()[big] + 1e-12).all()
    assert (back - x).abs().max() > 0  # rounded, not copied


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float8_products_equal_the_product_of_the_float8_rounded_operands(dtype):
    """Forward and the input's gradient of the float8 path are the exact products of float8-rounded operands
    (what `_scaled_mm` promises), close to the upcast path; the frozen weights get no gradient."""
    from vis2ir.quantize import Float8Linear, to_float8_rows

    torch.manual_seed(0)
    linear = nn.Linear(64, 96).to(dtype)
    fast, slow = Float8Linear(linear, float8=True), Float8Linear(linear, float8=False)
    assert fast.float8 and not slow.float8 and "products=float8" in repr(fast)
    x = torch.randn(2, 7, 64, dtype=dtype, requires_grad=True)
    y = fast(x)
    grad_out = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, x, grad_out)
    assert y.dtype == grad_x.dtype == dtype and y.shape == (2, 7, 96) and grad_x.shape == x.shape
    assert fast.weight.grad is None and not fast.weight.requires_grad and not fast.bias.requires_grad

    weight = fast.weight.float() * fast.weight_scale[:, None]  # the layer's float8 weight, exactly
    x8, xs = to_float8_rows(x.detach().reshape(-1, 64).float())
    expected = (x8.float() * xs) @ weight.t() + linear.bias.float()
    g8, gs = to_float8_rows(grad_out.reshape(-1, 96).float() * fast.weight_scale)
    expected_grad = (g8.float() * gs) @ fast.weight.float()
    rounding = 2**-7  # the bf16 output of `_scaled_mm`
    assert torch.allclose(y.reshape(-1, 96).float(), expected, rtol=rounding, atol=rounding * expected.abs().max().item())
    assert torch.allclose(grad_x.reshape(-1, 64).float(), expected_grad, rtol=rounding,
                          atol=rounding * expected_grad.abs().max().item())

    y_slow = slow(x)  # the weight-only path: same weights, the input not rounded
    (grad_slow,) = torch.autograd.grad(y_slow, x, grad_out)
    relative = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    assert 0 < relative(y, y_slow) < 0.06 and 0 < relative(grad_x, grad_slow) < 0.06


def test_a_cast_keeps_the_float8_weight_and_its_scales():
    """`.to(dtype)` (as Lightning's precision plugins and `train.precision=bf16-true` cast the model) casts the
    bias and the compute dtype, never the float8 weight or its float32 scales; the products stay the same."""
    from vis2ir.quantize import FLOAT8, Float8Linear

    layer = Float8Linear(nn.Linear(64, 32), float8=True)
    weight, scale = layer.weight.clone(), layer.weight_scale.clone()
    x = torch.randn(3, 64).to(torch.bfloat16)
    before = layer(x)
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == FLOAT8 and torch.equal(layer.weight.float(), weight.float())
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
    assert layer.bias.dtype == torch.bfloat16 and layer.compute_dtype == torch.bfloat16
    assert torch.allclose(layer(x).float(), before.float(), rtol=2**-7, atol=1e-3)
    layer.float()
    assert layer.weight.dtype == FLOAT8 and layer.bias.dtype == torch.float32 and layer.compute_dtype == torch.float32
    layer.to("meta")  # a move (here the one device a CPU can move to besides itself)
    assert layer.weight.is_meta and layer.weight.dtype == FLOAT8 and layer.weight_scale.is_meta
    assert not layer.weight.requires_grad


def test_a_layer_not_a_multiple_of_16_upcasts():
    from vis2ir.quantize import Float8Linear

    layer = Float8Linear(nn.Linear(40, 64), float8=True)  # `_scaled_mm` needs multiples of 16
    assert not layer.float8
    assert torch.isfinite(layer(torch.randn(3, 40))).all()


def test_fp8_products_run_in_float8_where_the_device_has_them(tiny_config, monkeypatch):
    """Where the device multiplies in float8 (here: told so), every block's linear layer multiplies in float8
    but the modulation layers (one row a sample); the model stays the same model and QLoRA trains on it."""
    import vis2ir.quantize as quantize

    available, line = quantize.float8_products("cpu")
    assert not available and "upcast" in line and "\n" not in line
    _, base = quantized(tiny_config, "none")
    _, upcast = quantized(tiny_config, "fp8")
    monkeypatch.setattr(quantize, "float8_products", lambda device: (True, "float8 products (test)"))
    cfg, model = quantized(tiny_config, "fp8")
    layers = {n: m for n, m in model.transformer.named_modules() if type(m).__name__ == "Float8Linear"}
    assert layers and all(not m.float8 for n, m in upcast.transformer.named_modules() if n in layers)
    modulation = {n for n in layers if n.endswith(("norm1.linear", "norm1_context.linear", "norm.linear"))}
    assert modulation and all(not layers[n].float8 for n in modulation)
    assert all(layers[n].float8 for n in layers.keys() - modulation)
    v0, v_upcast, v_float8 = velocity(base), velocity(upcast), velocity(model)
    assert 0 < ((v_float8 - v_upcast).norm() / v0.norm()).item() < 0.08  # activations rounded too
    assert ((v_float8 - v0).norm() / v0.norm()).item() < 0.1

    torch.manual_seed(0)
    add_lora(model.transformer, cfg.model.lora)
    lora = [p for n, p in model.transformer.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.bfloat16 for p in lora)  # peft keeps LoRA in the layer's compute dtype
    g = torch.Generator().manual_seed(0)
    vis, ir = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    pred, target = model(vis, ir, None, torch.tensor([0.3, 0.7]), torch.randn(2, 8, 64, generator=g))
    (pred.float() - target.float()).square().mean().backward()
    assert all(p.grad is None for n, p in model.transformer.named_parameters() if "lora_" not in n)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)
    assert any(p.grad.abs().sum() > 0 for n, p in model.transformer.named_parameters() if "lora_B" in n)  # B starts at 0
