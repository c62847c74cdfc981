"""Sampling as FluxFillPipeline does it (docs/design.md §1), as small functions.

    make_generators → get_noise → Vis2IRModel.encode → get_schedule → denoise → decode_target

With the same components, prompt, seed, steps and guidance, `generate` reproduces stock
`FluxFillPipeline` (mode `none`, or a zero adapter scale). Each image has its own CPU generator
seeded with the seed, so its result does not depend on its batch, and draws from it in the stock
order: the posterior sample of the whole canvas (which stock scales by zero at strength 1), the
initial noise, then the posterior sample of the masked canvas. With `model.backbone: flux1-kontext` the
same functions reproduce stock `FluxKontextPipeline(_auto_resize=False, max_area=H·W)`: the noise covers the
target alone and is the only draw, the photo enters as reference tokens (`vis2ir.backbones`), the schedule's
shift follows the target's token count, and nothing is cropped. With `flux2-klein`, stock `Flux2KleinPipeline`
(photo as `image`, at its own size): the same, with the noise drawn patchified, the shift from the token and
step counts, and true classifier-free guidance when guidance > 1 (`Vis2IRModel.predict`).

The adapter is applied to the model's input (`Vis2IRModel.conditioning` / `predict`): once per image
when it acts on the clean condition, at every step when it acts on x_t; the sampler's state stays the
un-enhanced x_t. Optional speed-ups (`speedup.py`): compiled blocks (exact within float rounding) and
step caches (approximate, off by default).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from vis2ir.backbones import get_lin_function
from vis2ir.errors import Vis2IRError
from vis2ir.latents import VAECodec, as_codec, decode_tokens, parameter_dtype
from vis2ir.model import Encoded, Vis2IRModel
from vis2ir.semantic.modes import crop_target, num_panels
from vis2ir.speedup import StepCache, loop_patches

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
    """Packed initial noise `[B, N, 4C]` for a `height × width` canvas (Fill) or target (Kontext, klein), drawn as
    FluxFillPipeline draws it (after a posterior sample of the canvas), FluxKontextPipeline (noise only) or
    Flux2KleinPipeline (noise only, drawn patchified: the spec's `noise_shape` and `pack_noise`)."""
    codec = as_codec(model.codec)
    spec = model.spec
    if isinstance(codec, VAECodec) and spec.posterior_draws:
        s = codec.scale_factor  # stock's posterior sample of the canvas, multiplied by σ₀ − 1 = 0
        draw(generators, (codec.latent_channels, height // s, width // s), codec.dtype)
    noise = draw(generators, spec.noise_shape(codec, height, width), parameter_dtype(model.transformer), device)
    return spec.pack_noise(noise)


def time_shift(mu: float, sigma: np.ndarray) -> np.ndarray:
    """σ' = e^mu / (e^mu + (1/σ − 1))."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def get_schedule(steps: int, seq_len: int, shift: bool = True, mu: float | None = None) -> torch.Tensor:
    """`steps + 1` float32 sigmas from 1 towards 0: `linspace(1, 1/steps, steps)`, shifted by `mu` (by default
    FLUX.1's `lerp(seq_len; 256→0.5, 4096→1.15)`; klein's `empirical_mu(seq_len, steps)`: the spec's `mu`), then
    a final 0 (in numpy float32, bit for bit as the scheduler computes them)."""
    sigmas = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    if shift:
        sigmas = time_shift(get_lin_function()(seq_len) if mu is None else mu, sigmas)
    return torch.from_numpy(np.concatenate([sigmas, np.zeros(1, np.float32)]))


@torch.no_grad()
def denoise(model: Vis2IRModel, enc: Encoded, x: torch.Tensor, sigmas: torch.Tensor, guidance: float,
            adapter_scale: float | None = None, return_attention: bool = False, progress: bool = False,
            cache: StepCache | None = None, callback: Callable[[int, int], None] | None = None):
    """Euler steps x ← x + (σ_next − σ)·v̂ from noise `x` along `sigmas`, as the scheduler steps.

    What does not change across steps is computed once: the conditioning (the adapter, when it acts on
    the clean condition; the guidance and prompt tensors), the timesteps and step sizes, the RoPE table;
    what changes with the step only, the blocks' adaLN modulation, is computed for all steps at once
    (`speedup.loop_patches`, the one place where the loop patches the transformer's forward).
    The loop itself builds no tensor on the host and reads nothing back (no host–device synchronisation;
    the `first_block` cache reads one number per step). `cache`: a step cache (`sample.cache`), or None.
    With `return_attention`, also the adapter's attention per layer `[B, heads, N, M]`, averaged over the
    steps (computed once when the adapter acts on the condition: it is the same at every step).
    `callback(done, steps)` is called after each step (e.g. a web page's progress bar).
    """
    sigmas = sigmas.to(x.device)
    steps = len(sigmas) - 1
    # The timesteps as the stock pipeline passes them: σ·1000 in the latents' dtype, then / 1000.
    timesteps = (sigmas[:-1] * NUM_TRAIN_TIMESTEPS).to(x.dtype) / NUM_TRAIN_TIMESTEPS
    deltas = sigmas[1:] - sigmas[:-1]
    b = x.shape[0]
    cond = model.conditioning(enc, guidance, return_attention, adapter_scale, true_cfg=True)
    if cache is not None and cond.negative is not None:  # the hooks would count both passes of a step as steps
        raise Vis2IRError(f"sample.cache={cache.settings.cache} with guidance {guidance:g} on "
                          f"model.backbone={model.spec.name}: a step cache does not yet follow true CFG's two passes; "
                          "use sample.cache=none, or guidance 1")
    total = None
    transformer = model.transformer
    with loop_patches(transformer, timesteps, cond.guidance, cond.pooled, cache) as at_step:
        for i in tqdm(range(steps), disable=not progress, desc="denoise", leave=False):
            at_step(i)
            out = model.predict(x, enc, cond, timesteps[i].expand(b), return_attention, adapter_scale)
            v, attention = out if return_attention else (out, None)
            x = (x.float() + deltas[i] * v).to(v.dtype)
            if cache is not None:
                cache.record()
            if attention is not None and attention is not cond.attention:
                total = attention if total is None else [s + a for s, a in zip(total, attention)]
            if callback is not None:
                callback(i + 1, steps)
    if not return_attention:
        return x
    if cond.attention is not None:
        return x, cond.attention
    return x, [a / steps for a in total] if total else []


@torch.no_grad()
def decode_target(model: Vis2IRModel, tokens: torch.Tensor, enc: Encoded) -> torch.Tensor:
    """Decode the tokens, then crop the infrared panel of a canvas: images `[B, 3, H, W]` in [0, 1]."""
    images = decode_tokens(model.codec, tokens, enc.height, enc.width)
    return crop_target(images, model.mode) if model.spec.canvas else images


@torch.no_grad()
def generate(model: Vis2IRModel, visible: torch.Tensor, semantic: torch.Tensor | None = None, steps: int = 28,
             guidance: float = 50.0, seed: int = 0, adapter_scale: float | None = None,
             return_attention: bool = False, progress: bool = False, cache: StepCache | None = None,
             callback: Callable[[int, int], None] | None = None):
    """Infrared images `[B, 3, H, W]` in [0, 1] for visible images in [0, 1] (sides multiples of the
    patch size); with `return_attention`, also the adapter's attention per layer (see `denoise`).
    `cache`: a step cache (`StepCache`, approximate), or None for the exact sampler; `callback(done, steps)`
    after each denoising step."""
    generators = make_generators(seed, visible.shape[0])
    panels = num_panels(model.mode) if model.spec.canvas else 1  # Kontext's noise covers the target alone
    x = get_noise(model, generators, visible.shape[-2], visible.shape[-1] * panels, visible.device)
    enc = model.encode(visible, None, semantic, generators)  # after the noise, as stock draws them
    sigmas = get_schedule(steps, x.shape[1], mu=model.spec.mu(x.shape[1], steps))
    out = denoise(model, enc, x, sigmas, guidance, adapter_scale, return_attention, progress, cache, callback)
    x, attention = out if return_attention else (out, None)
    images = decode_target(model, x, enc)
    return (images, attention) if return_attention else images
