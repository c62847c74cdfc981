"""The flow-matching objective, in one place (docs/design.md §1, §3): what training draws and fits, and the
convention the sampler integrates.

    t ~ sigmoid(N(mean, std)) (optionally shifted)       sample_timesteps
    x_1 ~ N(0, I) (+ offset noise per channel)           sample_noise, offset_group
    x_t = (1 − t)·x_0 + t·x_1                            interpolate
    v = x_1 − x_0                                        velocity_target
    loss = mse(v̂, v) over all or the target tokens       flow_loss
    the same loss at fixed t and noise (comparable)      fixed_draw_loss

t = 0 is the data, t = 1 the noise: the sampler (`sample.denoise`) starts at σ = 1 from noise and takes Euler
steps x ← x + (σ_next − σ)·v̂ down to σ = 0, which with the exact velocity lands on x_0.
Below the model (`model.Vis2IRModel.forward` builds its x_t and target here): torch only.
"""

from __future__ import annotations

import torch


def sample_timesteps(n: int, mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Logit-normal flow times `[n]` in (0, 1); `shift > 1` moves them towards the noise end."""
    device = generator.device if generator is not None else None
    t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    return shift * t / (1 + (shift - 1) * t) if shift != 1.0 else t


def sample_noise(x_0: torch.Tensor, offset: float = 0.0, generator: torch.Generator | None = None,
                 group: int = 4) -> torch.Tensor:
    """x_1 ~ N(0, I) shaped as the packed tokens `x_0` `[B, N, D]`, plus offset noise when `offset > 0`: one
    N(0, offset²) value per sample and channel, the same at every position of the image.

    A packed token holds its channels one after the other (`latents.pack`: channel-major, index c·4 + 2i + j
    for the 2×2 patch), so a channel is `group` consecutive entries (`offset_group`: 4 for a VAE's latents,
    4·s² for the pixel codec, whose s×s sub-pixels of one colour are one channel)."""
    kw = dict(generator=generator, device=x_0.device, dtype=x_0.dtype)
    noise = torch.randn(x_0.shape, **kw)
    if offset > 0:
        channels = torch.randn(x_0.shape[0], 1, x_0.shape[2] // group, **kw)
        noise = noise + offset * channels.repeat_interleave(group, dim=2)
    return noise


def offset_group(codec) -> int:
    """Entries of a packed token that belong to one image channel (`sample_noise`'s `group`)."""
    from vis2ir.latents import PixelCodec, as_codec

    codec = as_codec(codec)
    return 4 * codec.scale_factor ** 2 if isinstance(codec, PixelCodec) else 4


def interpolate(x_0: torch.Tensor, x_1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t)·x_0 + t·x_1 for tokens `[B, N, D]` at flow times `t` `[B]`, in `x_0`'s dtype."""
    tt = t.to(x_0.dtype).view(-1, 1, 1)
    return (1 - tt) * x_0 + tt * x_1


def velocity_target(x_0: torch.Tensor, x_1: torch.Tensor) -> torch.Tensor:
    """The velocity dx_t/dt = x_1 − x_0 that the model learns (`[B, N, D]`)."""
    return x_1 - x_0


def flow_loss(pred: torch.Tensor, target: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error (fp32 scalar) of `pred` against `target` `[B, N, D]` over all tokens, or over the
    tokens selected by the boolean `[N]` mask."""
    err = (pred.float() - target.float()).square()
    if tokens is None:
        return err.mean()
    # A weighted mean, not err[:, tokens]: boolean indexing would wait for the GPU to count the tokens.
    return (err * tokens.view(1, -1, 1)).sum() / (tokens.sum() * err.shape[0] * err.shape[2])


FIXED_TIMES = (0.25, 0.5, 0.75)  # the flow times of `fixed_draw_loss`


def fixed_draw_loss(model, visible: torch.Tensor, infrared: torch.Tensor, semantic: torch.Tensor | None,
                    generator: torch.Generator, guidance: float = 1.0, loss_region: str = "all") -> torch.Tensor:
    """`flow_loss` of `model` (a `Vis2IRModel`) on one batch (`[B, 3, H, W]` in [0, 1]) at the flow times
    `FIXED_TIMES`, with noise drawn on the CPU from `generator` (one draw per time), averaged over the times: the
    same draw for every model and step, so two values compare (the training loss draws its times and noise anew
    each step, and the loss at small t is many times that at large t). Training's validation loss and the
    demo's before/after comparison. `loss_region`: `train.loss_region`."""
    enc = model.encode(visible, infrared, semantic)
    tokens = model.target_tokens(enc) if loss_region == "target" else None
    losses = []
    for tv in FIXED_TIMES:
        t = torch.full((visible.shape[0],), tv, device=visible.device)
        noise = torch.randn(enc.x_0.shape, generator=generator).to(enc.x_0.device)
        pred, target = model(visible, infrared, semantic, t, noise, guidance=guidance, encoded=enc)
        losses.append(flow_loss(pred, target, tokens))
    return torch.stack(losses).mean()
