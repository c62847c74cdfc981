"""Sampling as FluxFillPipeline does it (docs/design.md §1), as small functions.

    make_generators → get_noise → Vis2IRModel.encode → get_schedule → denoise → decode_target

With the same components, prompt, seed, steps and guidance, `generate` reproduces stock
`FluxFillPipeline` (mode `none`, or a zero adapter scale). Each image has its own CPU generator
seeded with the seed, so its result does not depend on its batch, and draws from it in the stock
order: the posterior sample of the whole canvas (which stock scales by zero at strength 1), the
initial noise, then the posterior sample of the masked canvas.

The adapter is applied to the model's input at every step (inside `Vis2IRModel.velocity`); the
sampler's state stays the un-enhanced x_t.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from vis2ir.latents import VAECodec, as_codec, decode_tokens, pack
from vis2ir.model import Encoded, Vis2IRModel
from vis2ir.semantic.modes import crop_target, num_panels

NUM_TRAIN_TIMESTEPS = 1000  # FlowMatchEulerDiscreteScheduler's; the transformer divides it back out


def make_generators(seed: int, count: int) -> list[torch.Generator]:
    """One CPU generator per image, each seeded with `seed`."""
    return [torch.Generator("cpu").manual_seed(seed) for _ in range(count)]


def draw(generators: list[torch.Generator], shape: tuple[int, ...], dtype: torch.dtype, device=None) -> torch.Tensor:
    """`randn [len(generators), *shape]`, one row per generator, drawn on the CPU (as diffusers' `randn_tensor`)."""
    rows = [torch.randn((1, *shape), generator=g, dtype=dtype) for g in generators]
    return torch.cat(rows).to(device)


def get_noise(model: Vis2IRModel, generators: list[torch.Generator], height: int, width: int,
              device=None) -> torch.Tensor:
    """Packed initial noise `[B, N, 4C]` for a `height × width` canvas, drawn as FluxFillPipeline draws it."""
    codec = as_codec(model.codec)
    s = codec.scale_factor
    shape = (codec.latent_channels, height // s, width // s)
    if isinstance(codec, VAECodec):
        draw(generators, shape, codec.dtype)  # stock's posterior sample of the canvas, multiplied by σ₀ − 1 = 0
    return pack(draw(generators, shape, model.transformer.dtype, device))


def time_shift(mu: float, sigma: np.ndarray) -> np.ndarray:
    """σ' = e^mu / (e^mu + (1/σ − 1))."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def get_lin_function(x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15):
    """The line through (x1, y1) and (x2, y2): FLUX's shift `mu` for a sequence length."""
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: x * m + b


def get_schedule(steps: int, seq_len: int, shift: bool = True) -> torch.Tensor:
    """`steps + 1` float32 sigmas from 1 towards 0: `linspace(1, 1/steps, steps)`, shifted by
    `mu = lerp(seq_len; 256→0.5, 4096→1.15)`, then a final 0 (in numpy float32, bit for bit as the
    scheduler computes them)."""
    sigmas = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    if shift:
        sigmas = time_shift(get_lin_function()(seq_len), sigmas)
    return torch.from_numpy(np.concatenate([sigmas, np.zeros(1, np.float32)]))


@torch.no_grad()
def denoise(model: Vis2IRModel, enc: Encoded, x: torch.Tensor, sigmas: torch.Tensor, guidance: float,
            adapter_scale: float | None = None, return_attention: bool = False, progress: bool = False,
            callback: Callable[[int, int], None] | None = None):
    """Euler steps x ← x + (σ_next − σ)·v̂ from noise `x` along `sigmas`, as the scheduler steps.

    With `return_attention`, also the adapter's attention per layer `[B, heads, N, M]`, averaged
    over the steps. `callback(done, steps)` is called after each step (e.g. a web page's progress bar).
    """
    sigmas = sigmas.to(x.device)
    total = None
    for done, (sigma, sigma_next) in enumerate(tqdm(list(zip(sigmas[:-1], sigmas[1:])), disable=not progress,
                                                    desc="denoise", leave=False), 1):
        # The timestep as the stock pipeline passes it: σ·1000 in the latents' dtype, then / 1000.
        t = (sigma * NUM_TRAIN_TIMESTEPS).expand(x.shape[0]).to(x.dtype) / NUM_TRAIN_TIMESTEPS
        out = model.velocity(x, enc, t, guidance, return_attention=return_attention, adapter_scale=adapter_scale)
        v, attention = out if return_attention else (out, None)
        x = (x.float() + (sigma_next - sigma) * v).to(v.dtype)
        if attention is not None:
            total = attention if total is None else [a + b for a, b in zip(total, attention)]
        if callback is not None:
            callback(done, len(sigmas) - 1)
    if not return_attention:
        return x
    return x, [a / (len(sigmas) - 1) for a in total] if total else []


@torch.no_grad()
def decode_target(model: Vis2IRModel, tokens: torch.Tensor, enc: Encoded) -> torch.Tensor:
    """Decode the whole canvas, then crop the infrared panel: images `[B, 3, H, W]` in [0, 1]."""
    canvas = decode_tokens(model.codec, tokens, enc.height, enc.width)
    return crop_target(canvas, model.mode)


@torch.no_grad()
def generate(model: Vis2IRModel, visible: torch.Tensor, semantic: torch.Tensor | None = None, steps: int = 28,
             guidance: float = 50.0, seed: int = 0, adapter_scale: float | None = None,
             return_attention: bool = False, progress: bool = False,
             callback: Callable[[int, int], None] | None = None):
    """Infrared images `[B, 3, H, W]` in [0, 1] for visible images in [0, 1] (sides multiples of the
    patch size); with `return_attention`, also the adapter's attention per layer; `callback(done, steps)`
    after each denoising step (see `denoise`)."""
    generators = make_generators(seed, visible.shape[0])
    x = get_noise(model, generators, visible.shape[-2], visible.shape[-1] * num_panels(model.mode), visible.device)
    enc = model.encode(visible, None, semantic, generators)  # after the noise, as stock draws them
    sigmas = get_schedule(steps, x.shape[1])
    out = denoise(model, enc, x, sigmas, guidance, adapter_scale, return_attention, progress, callback)
    x, attention = out if return_attention else (out, None)
    images = decode_target(model, x, enc)
    return (images, attention) if return_attention else images
