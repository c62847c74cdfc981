"""Sampling as FluxFillPipeline does it (DESIGN §1), as small pure functions.

    get_noise → get_schedule → denoise → decode_target

The adapter is applied to the model's input at every step (inside `Vis2IRModel.velocity`); the
sampler's state stays the un-enhanced x_t.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from vis2ir.latents import as_codec, decode_tokens, pack
from vis2ir.model import Encoded, Vis2IRModel
from vis2ir.semantic.modes import crop_target


def get_noise(batch: int, channels: int, height: int, width: int, seed: int, device=None,
              dtype=torch.float32) -> torch.Tensor:
    """Packed initial noise drawn as FluxFillPipeline draws it: `randn` of the latent image
    `[B, C, h, w]` from a CPU generator seeded with `seed`, then packed."""
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn(batch, channels, height, width, generator=generator, dtype=dtype)
    return pack(latents).to(device)


def time_shift(mu: float, sigma: torch.Tensor) -> torch.Tensor:
    """σ' = e^mu / (e^mu + (1/σ − 1))."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def get_lin_function(x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15):
    m = (y2 - y1) / (x2 - x1)
    return lambda x: m * x + (y1 - m * x1)


def get_schedule(steps: int, seq_len: int, shift: bool = True) -> torch.Tensor:
    """`steps + 1` sigmas from 1 towards 0: `linspace(1, 1/steps, steps)`, shifted by
    `mu = lerp(seq_len; 256→0.5, 4096→1.15)`, then a final 0."""
    sigmas = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    if shift:
        sigmas = time_shift(get_lin_function()(seq_len), sigmas)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


@torch.no_grad()
def denoise(model: Vis2IRModel, enc: Encoded, x: torch.Tensor, sigmas: torch.Tensor, guidance: float,
            progress: bool = False) -> torch.Tensor:
    """Euler steps x ← x + (σ_next − σ)·v̂ from noise `x` along `sigmas`."""
    for sigma, sigma_next in tqdm(list(zip(sigmas[:-1], sigmas[1:])), disable=not progress, desc="denoise",
                                  leave=False):
        t = sigma.to(x.device).expand(x.shape[0])
        v = model.velocity(x, enc, t, guidance)
        x = (x.float() + (sigma_next - sigma).item() * v.float()).to(x.dtype)
    return x


@torch.no_grad()
def decode_target(model: Vis2IRModel, tokens: torch.Tensor, enc: Encoded) -> torch.Tensor:
    """Decode the whole canvas, then crop the infrared panel: images `[B, 3, H, W]` in [0, 1]."""
    canvas = decode_tokens(model.codec, tokens, enc.height, enc.width)
    return crop_target(canvas, model.mode)


@torch.no_grad()
def generate(model: Vis2IRModel, visible: torch.Tensor, semantic: torch.Tensor | None = None, steps: int = 28,
             guidance: float = 50.0, seed: int = 0, progress: bool = False) -> torch.Tensor:
    """Infrared images `[B, 3, H, W]` in [0, 1] for visible images in [0, 1]."""
    enc = model.encode(visible, None, semantic)
    codec = as_codec(model.codec)
    s = codec.scale_factor
    x = get_noise(visible.shape[0], codec.latent_channels, enc.height // s, enc.width // s, seed,
                  device=visible.device, dtype=model.transformer.dtype)
    sigmas = get_schedule(steps, x.shape[1])
    return decode_target(model, denoise(model, enc, x, sigmas, guidance, progress), enc)
