"""A quantized frozen base: FLUX's transformer blocks stored in float8 or NF4 (`model.quantize`).

Only the frozen base is quantized, so LoRA and the adapter train on top of it in full precision
(QLoRA). The layers quantized are the `nn.Linear` layers inside the transformer's double and single
blocks — 99.6 % of FLUX.1 Fill's weights; the embedders and the output projection stay as they are
(small, and `channel_concat` widens `x_embedder`). Libraries, chosen by what works with peft LoRA on
top on CUDA and on the CPU (docs/performance.md):

- `fp8`: torchao's `Float8WeightOnlyConfig` — float8 (e4m3) weights with a scale per row, upcast for
  each matmul; half the bytes of bf16.
- `nf4`: bitsandbytes' `Linear4bit` with NF4 (the QLoRA data type, blocks of 64 with their scales
  quantized again); about 0.28 × the bytes of bf16.

Blocks are quantized one at a time as they move to the device, so a real-size transformer never
sits whole in bf16 on the GPU: the peak is the quantized weights plus one bf16 block.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

import torch
from torch import nn

from vis2ir.errors import Vis2IRError

log = logging.getLogger(__name__)

QUANTIZE = ("none", "fp8", "nf4")
# What each setting needs: the import name, the pip requirement.
LIBRARIES = {"fp8": ("torchao", "torchao>=0.18"), "nf4": ("bitsandbytes", "bitsandbytes>=0.45")}
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def require(how: str) -> None:
    """Fail in one line when `model.quantize=how` cannot run here (library missing).

    Raises `Vis2IRError` naming what to install or which setting to change.
    """
    if how not in QUANTIZE:
        raise Vis2IRError(f"model.quantize: {how!r} is not one of {', '.join(QUANTIZE)}")
    if how == "none":
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
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t) not in (torch.Tensor, nn.Parameter):  # a torchao tensor subclass
        names, _ = t.__tensor_flatten__()
        return sum(_storage_bytes(getattr(t, n)) for n in names)
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


def _fp8(block: nn.Module, device: torch.device) -> None:
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    quantize_(block, Float8WeightOnlyConfig(), filter_fn=lambda m, _: type(m) is nn.Linear, device=device)


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
