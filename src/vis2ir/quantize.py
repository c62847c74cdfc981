"""A quantized frozen base: FLUX's transformer blocks stored in float8 or NF4 (`model.quantize`).

Only the frozen base is quantized, so LoRA and the adapter train on top of it in full precision
(QLoRA). The layers quantized are the `nn.Linear` layers inside the transformer's double and single
blocks — 99.6 % of FLUX.1 Fill's weights; the embedders and the output projection stay as they are
(small, and `channel_concat` widens `x_embedder`). Docs: docs/performance.md.

- `fp8`: `Float8Linear` (this module) — float8 (e4m3) weights with a scale per output row, half the
  bytes of bf16. On GPUs that multiply in float8 (CUDA compute capability ≥ 8.9: Ada, Hopper and
  later) the products run in float8: each input row is scaled into float8 on the fly (a dynamic scale
  per token) and `torch._scaled_mm` multiplies with the row scales applied to its float32 accumulator —
  torchao's "rowwise" float8 recipe, forward and backward, the backward without the weight's gradient
  since the base is frozen (torchao's float8 inference tensors have no backward; its float8 training
  layers keep bf16 weights and compute the weight's gradient). The modulation layers (whose input is one
  row per sample) keep upcasting. Elsewhere (older GPUs, the CPU) each weight is upcast for its product:
  smaller, not faster; one log line says so.
- `nf4`: bitsandbytes' `Linear4bit` with NF4 (the QLoRA data type, blocks of 64 with their scales
  quantized again); about 0.28 × the bytes of bf16.

Blocks are quantized one at a time as they move to the device, so a real-size transformer never
sits whole in bf16 on the GPU: the peak is the quantized weights plus one bf16 block.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vis2ir.errors import Vis2IRError, describe

log = logging.getLogger(__name__)

QUANTIZE = ("none", "fp8", "nf4")
# What each setting needs: the import name, the pip requirement.
LIBRARIES = {"nf4": ("bitsandbytes", "bitsandbytes>=0.45")}
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def require(how: str) -> None:
    """Fail in one line when `model.quantize=how` cannot run here (library missing).

    Raises `Vis2IRError` naming what to install or which setting to change.
    """
    if how not in QUANTIZE:
        raise Vis2IRError(f"model.quantize: {how!r} is not one of {', '.join(QUANTIZE)}")
    if how not in LIBRARIES:
        return
    module, requirement = LIBRARIES[how]
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - an ImportError, or a library that fails while importing
        raise Vis2IRError(f"model.quantize={how} needs {module}, which does not import here ({type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); "
                          f"pip install '{requirement}' (or pip install 'vis2ir[quantize]'), "
                          "or set model.quantize=none") from None


def blocks(transformer: nn.Module) -> list[nn.Module]:
    """The transformer's double and single blocks, in order."""
    return [b for name in BLOCK_LISTS for b in getattr(transformer, name, [])]


def quantize_transformer(transformer: nn.Module, how: str, device: torch.device | str,
                         fill: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Move `transformer` to `device`, its blocks' linear layers quantized as `how` says.

    `fill(block)`: called on each block once it is on the device, before quantizing (to give the
    empty weights of a real-size random model their values). The transformer's dtype (bf16 on CUDA)
    is the compute dtype. Returns the same module (frozen when quantized). Raises `Vis2IRError` as
    `require` does.
    """
    require(how)
    device = torch.device(device)
    if how == "fp8":
        log.info("model.quantize=fp8: %s", float8_products(device)[1])
    for name, child in transformer.named_children():  # everything but the blocks: as it is
        if name not in BLOCK_LISTS:
            _to_device(child, device, fill)
    for block in blocks(transformer):
        _to_device(block, device, fill)
        if how != "none":
            _QUANTIZERS[how](block, device)
    for p in transformer.parameters(recurse=False):  # none in diffusers' Flux; kept general
        p.data = p.data.to(device)
    if how != "none":
        transformer.requires_grad_(False)
        log.info("Quantized the transformer's blocks to %s: %.2f GiB of weights on %s", how,
                 weight_bytes(transformer) / 2**30, device)
    return transformer


def weight_bytes(module: nn.Module) -> int:
    """Bytes the module's parameters and buffers occupy, quantized storage included."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        total += _storage_bytes(t)
    return total


def _storage_bytes(t: torch.Tensor) -> int:
    state = getattr(t, "quant_state", None)  # bitsandbytes Params4bit: packed data + scales
    extra = 0
    if state is not None:
        extra = sum(v.numel() * v.element_size() for v in _tensors(state))
    return t.numel() * t.element_size() + extra


def _tensors(state) -> list[torch.Tensor]:
    out = [v for v in (getattr(state, "absmax", None), getattr(state, "code", None)) if isinstance(v, torch.Tensor)]
    nested = getattr(state, "state2", None)
    return out + (_tensors(nested) if nested is not None else [])


def _to_device(module: nn.Module, device: torch.device, fill) -> None:
    if any(p.is_meta for p in module.parameters()):
        module.to_empty(device=device)
        if fill is not None:
            fill(module)
    else:
        module.to(device)


def _linear_children(module: nn.Module):
    """`(parent, name, linear)` for every `nn.Linear` under `module` (exact type: not LoRA wrappers)."""
    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                yield parent, name, child


# ----------------------------------------------------------------------------------------------
# Float8 weights, and float8 products where the device has them

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = torch.finfo(FLOAT8).max  # 448: e4m3's largest finite value (OCP FP8 formats, 2023)


@functools.cache
def float8_products(device: torch.device | str) -> tuple[bool, str]:
    """Whether `device` multiplies in float8 — CUDA compute capability ≥ 8.9, and a 16×16 row-scaled
    `torch._scaled_mm` runs there with this PyTorch (some builds lack the kernel for a chip) — and one line
    saying what `model.quantize=fp8` does there. Cached per device."""
    device = torch.device(device)
    upcast = "float8 weights upcast for each product (half the memory of bf16, not faster)"
    if not (device.type == "cuda" and torch.cuda.is_available()):
        return False, f"{upcast} on the {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    name = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    if (major, minor) < (8, 9):
        return False, f"{name} has no float8 products: {upcast}"
    try:
        a = torch.ones(16, 16, device=device).to(FLOAT8)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1, device=device),
                         scale_b=torch.ones(1, 16, device=device), out_dtype=torch.bfloat16)
    except RuntimeError as err:
        return False, f"torch {torch.__version__} cannot multiply in float8 on {name} ({describe(err)}): {upcast}"
    return True, f"float8 weights, products in float8 on {name}"


def to_float8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` (M, K), any float dtype, as float8 e4m3 rows and their scales: `x ≈ x8.float() * scale`.

    Returns `(x8, scale)`: x8 (M, K) float8_e4m3fn; scale (M, 1) float32, each row's absolute maximum / 448 (an
    all-zero row gets a tiny scale, not a division by zero). Rounding error: relative 2^-4 at most per element.
    """
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True)  # one pass, exact in x's dtype
    scale = amax.float().clamp(min=1e-12) / FLOAT8_MAX
    return (x.float() / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8), scale


class _Float8Product(torch.autograd.Function):
    """`x @ (weight8 · scale)ᵀ` in float8: x (M, K) high precision, weight8 (N, K) float8, scale (N,) float32.

    Forward: x's rows scaled into float8 on the fly, one `torch._scaled_mm` with x's row scales and the
    weight's row scales (out: bf16, accumulated in float32). Backward: only x's gradient (the weight is
    frozen): `grad_x = (grad · scale) @ weight8`, the weight's row scales folded into the gradient's columns
    before its rows are scaled into float8, so the float8 weight serves both products. The backward takes a
    transposed copy of the float8 weight (`_scaled_mm` wants its second matrix column-major): N·K bytes of
    memory traffic per layer, freed at once.
    """

    @staticmethod
    def forward(ctx, x, weight8, scale):
        x8, x_scale = to_float8_rows(x)
        ctx.save_for_backward(weight8, scale)
        ctx.dtype = x.dtype
        return torch._scaled_mm(x8, weight8.t(), scale_a=x_scale, scale_b=scale[None, :],
                                out_dtype=torch.bfloat16).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        weight8, scale = ctx.saved_tensors
        g8, g_scale = to_float8_rows(grad.float() * scale)
        ones = torch.ones(1, weight8.shape[1], dtype=torch.float32, device=grad.device)
        # `_scaled_mm` takes its second matrix column-major: the (N, K) weight as a transposed (K, N) copy
        grad_x = torch._scaled_mm(g8, weight8.t().contiguous().t(), scale_a=g_scale, scale_b=ones,
                                  out_dtype=torch.bfloat16)
        return grad_x.to(ctx.dtype), None, None


class Float8Linear(nn.Linear):
    """A frozen `nn.Linear` stored in float8 e4m3 with a float32 scale per output row (`model.quantize=fp8`).

    `weight` (out, in) float8_e4m3fn and `weight_scale` (out,) float32, `weight ≈ weight8 · scale` (each row's
    absolute maximum maps to 448); `bias` as it was. Input (..., in) in `compute_dtype` (the layer's dtype
    before quantizing); output (..., out) in the input's dtype. `float8=True`: products in float8
    (`_Float8Product`; needs `torch._scaled_mm`, and in and out features multiples of 16, else upcast);
    `False`: the weight upcast to the input's dtype for each product. Frozen: no gradient for its weights,
    gradients flow to the input. An `nn.Linear` so that peft wraps it with LoRA (in `compute_dtype`).
    """

    def __init__(self, linear: nn.Linear, float8: bool):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype  # peft keeps a LoRA on this layer in this dtype
        weight8, scale = to_float8_rows(linear.weight.detach())
        self.weight = nn.Parameter(weight8, requires_grad=False)
        self.register_buffer("weight_scale", scale.squeeze(1))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.float8 = float8 and self.in_features % 16 == 0 and self.out_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float8:
            y = _Float8Product.apply(x.reshape(-1, self.in_features), self.weight, self.weight_scale)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        weight = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def _apply(self, fn, recurse=True):
        """Moves follow `fn`; casts (`.to(dtype)`, `.bfloat16()`, Lightning's precision plugins) leave the float8
        weight and its float32 scales as they are, and cast the bias and the compute dtype instead."""
        single, half = (fn(torch.zeros((), dtype=d, device=self.weight.device)) for d in (torch.float32, torch.half))
        self.weight = nn.Parameter(self.weight.data.to(single.device), requires_grad=False)
        self.weight_scale = self.weight_scale.to(single.device)
        if self.bias is not None:
            self.bias = nn.Parameter(fn(self.bias.data), requires_grad=False)
        if single.dtype != torch.float32 or half.dtype != torch.half:  # a cast: what `fn` did to either probe
            self.compute_dtype = single.dtype if single.dtype != torch.float32 else half.dtype
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"products={'float8' if self.float8 else 'upcast'}")


def _fp8(block: nn.Module, device: torch.device) -> None:
    float8, _ = float8_products(device)
    for parent, name, linear in list(_linear_children(block)):
        modulation = name == "linear" and "norm" in type(parent).__name__.lower()  # AdaLayerNorm*: one row a sample
        setattr(parent, name, Float8Linear(linear, float8=float8 and not modulation))


def _nf4(block: nn.Module, device: torch.device) -> None:
    import bitsandbytes as bnb

    for parent, name, linear in list(_linear_children(block)):
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=linear.weight.dtype, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu") if device.type == "cpu" else linear.weight.data,
                                     requires_grad=False, quant_type="nf4", module=q)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        setattr(parent, name, q.to(device))  # bitsandbytes quantizes on the move to a device


_QUANTIZERS = {"fp8": _fp8, "nf4": _nf4}


# ----------------------------------------------------------------------------------------------
# Out of memory: one line with the settings that would fit

# Peak `torch.cuda.max_memory_allocated`, GiB, of the real-size FLUX.1-Fill transformer at 512×512
# panels (a 512×1024 canvas), measured on an H200 (docs/performance.md, docs/performance/quantize/):
# `vis2ir train` at batch 1 with gradient checkpointing (the bf16 figure: a plain bf16 LoRA step), and
# `vis2ir generate` with 28 steps.
MEASURED_PEAK_GIB = {
    "training": {"none": 24.3, "fp8": 15.2, "nf4": 10.1},
    "generation": {"none": 23.6, "fp8": 12.6, "nf4": 7.3},
}


class OutOfMemory(Vis2IRError):
    """The device ran out of memory; the message names settings measured to fit in less."""


def out_of_memory(task: str, cfg, device: torch.device | str | None = None) -> OutOfMemory:
    """The one-line answer to an out-of-memory error during `task` ('training' or 'generation'):
    the card's size, this run's settings, and the measured peaks of the settings that use less."""
    device = torch.device(device) if device is not None else None
    card = ""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        card = f" on {props.name} ({props.total_memory / 2**30:.1f} GiB)"
    peaks = ", ".join(f"{'bf16' if q == 'none' else q} {gib:g} GiB" for q, gib in MEASURED_PEAK_GIB[task].items())
    if task == "training":
        now = (f"now model.quantize={cfg.model.quantize}, train.batch_size={cfg.train.batch_size}, "
               f"train.gradient_checkpointing={str(cfg.train.gradient_checkpointing).lower()}")
        fix = ("set model.quantize=fp8 or nf4, train.batch_size=1 (train.accumulate_grad_batches keeps the "
               "effective batch) and train.gradient_checkpointing=true")
        what = "vis2ir train at batch 1 with checkpointing"
    else:
        now = f"now model.quantize={cfg.model.quantize}"
        fix = ("set model.quantize=fp8 or nf4, generate --offload sequential (slowest, least memory), "
               "sample.vae_tiling=true for large images, or a smaller --size")
        what = "vis2ir generate, 28 steps"
    return OutOfMemory(f"out of memory during {task}{card} ({now}): {fix}; measured peaks at 512x512 panels "
                       f"({what}, docs/performance.md): {peaks}")
