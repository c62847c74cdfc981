"""Images ↔ packed latent tokens: codecs, pack / unpack, ids, and the FLUX Fill inputs.

Small pure functions in the style of black-forest-labs/flux `sampling.py`. Images are float
tensors `[B, 3, H, W]` in [0, 1]; codecs work in [-1, 1]. Every size (latent channels, mask
channels, token count) follows from the codec, so the FLUX VAE, a tiny VAE and the pixel codec
all go through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from vis2ir.errors import Vis2IRError


def parameter_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of `module`'s first floating-point parameter (float32 when it has none).

    What diffusers' `ModelMixin.dtype` answers for the models here, without its walk over every submodule in
    search of layer-wise casting hooks first: on FLUX with LoRA (~4 700 modules) that walk took 12 ms on a CPU
    core, three times in every training step and once in every sampling step, before the step's first kernel.
    """
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


# ----------------------------------------------------------------------------------------------
# Codecs


@dataclass
class PixelCodec:
    """An exact space-to-depth "autoencoder": s×s pixel blocks become 3·s² channels.

    Lets a small transformer trained from scratch make real pictures with no pretrained VAE
    (docs/design.md §6). Encoding is lossless; `decode(encode(x)) == x`.
    """

    factor: int = 4

    @property
    def latent_channels(self) -> int:
        return 3 * self.factor**2

    @property
    def scale_factor(self) -> int:
        return self.factor

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        s = self.factor
        return rearrange(images, "b c (h s1) (w s2) -> b (c s1 s2) h w", s1=s, s2=s)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        s = self.factor
        return rearrange(latents, "b (c s1 s2) h w -> b c (h s1) (w s2)", s1=s, s2=s)


WIDE_GROUP = 2**19  # elements per (sample, group) from which `VAEGroupNorm` takes its own path on CUDA


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """`F.group_norm` (Wu & He 2018) from `torch.var_mean`, a float32 mean and one `addcmul`.

    x `[N, C, *]`, any float dtype; the statistics and the per-channel scale and shift are float32 and the
    result is x's dtype. The variance is taken on a float32 copy of x when x's dtype has a narrower range
    (float16: its variance overflows once the spread passes 256). Differentiable. PyTorch's CUDA kernel reduces
    each (sample, group) in one thread block, so a batch-1 image with 32 groups keeps 32 of the GPU's SMs busy;
    `var_mean` and `mean` split long reductions over many. Measured on one H200 in bf16 (docs/performance.md):
    0.53 against 1.89 ms for `[1, 128, 512, 1024]`, 0.28 against 0.96 ms for `[1, 256, 256, 512]`, but 0.16
    against 0.07 ms for `[1, 512, 64, 128]` (hence `WIDE_GROUP`); its largest difference from a float32
    reference was below the native kernel's there.
    """
    n, c = x.shape[:2]
    grouped = x.reshape(n, num_groups, -1)
    narrow = torch.finfo(x.dtype).max < torch.finfo(torch.float32).max  # float16
    # Welford in float32, rounded to the dtype it ran on (bfloat16 has float32's range)
    var = torch.var_mean(grouped.float() if narrow else grouped, dim=-1, correction=0)[0].float()
    mean = grouped.mean(-1, dtype=torch.float32)  # exact to float32: the mean carries the cancellation
    per_group = c // num_groups
    scale = torch.rsqrt(var + eps).repeat_interleave(per_group, 1)  # [N, C]
    if weight is not None:
        scale = scale * weight.float()
    shift = -mean.repeat_interleave(per_group, 1) * scale
    if bias is not None:
        shift = shift + bias.float()
    shape = (n, c) + (1,) * (x.dim() - 2)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    out = None if grad else torch.empty_like(x)  # out= rounds once to x's dtype; autograd refuses it
    return torch.addcmul(shift.view(shape), x, scale.view(shape), out=out).to(x.dtype)


class VAEGroupNorm(torch.nn.GroupNorm):
    """The VAE's `GroupNorm`, computed by `group_norm` on CUDA when each group is at least `WIDE_GROUP` elements
    (the full-resolution layers of a batch-1 image: 2.3 ms each with PyTorch's kernel on an H200; the FLUX VAE's
    encode + decode of a 512×1024 image 65 → 49 ms), in bfloat16 or float32 and not under autocast; by PyTorch's
    kernel otherwise (the CPU's is fast; float16 is measured only with PyTorch's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.is_cuda and x.dtype != torch.float16 and x[:1].numel() // self.num_groups >= WIDE_GROUP
                and not torch.is_autocast_enabled(x.device.type)):
            return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


def use_vae_group_norm(vae: torch.nn.Module) -> int:
    """Make each `torch.nn.GroupNorm` in `vae` a `VAEGroupNorm`, in place; returns how many. The modules stay the
    same objects (their class is changed): their weights, state-dict keys and hooks stay, e.g. those of accelerate's
    CPU offload on a user's VAE, which hold the weights elsewhere (a hooked module keeps PyTorch's kernel)."""
    norms = [m for m in vae.modules() if type(m) is torch.nn.GroupNorm]
    for norm in norms:
        norm.__class__ = VAEGroupNorm
    return len(norms)


class VAECodec:
    """A diffusers `AutoencoderKL`, with FLUX's latent normalisation read from its config.

    `encode` returns `(z − shift) · scale`; the posterior mode by default, a sample when a
    generator is given (as diffusers' `retrieve_latents` does). Its group norms become `VAEGroupNorm`s.
    """

    def __init__(self, vae: torch.nn.Module):
        self.vae = vae
        use_vae_group_norm(vae)
        cfg = vae.config
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.scale = float(getattr(cfg, "scaling_factor", None) or 1.0)
        self.latent_channels = int(cfg.latent_channels)
        self.scale_factor = 2 ** (len(cfg.block_out_channels) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return parameter_dtype(self.vae)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(images.to(self.dtype)).latent_dist
        z = dist.sample(generator) if generator is not None else dist.mode()
        return (z - self.shift) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.dtype) / self.scale + self.shift
        return self.vae.decode(z).sample


Codec = PixelCodec | VAECodec


def as_codec(vae) -> Codec:
    """Accept a codec, or a diffusers `AutoencoderKL` directly."""
    if isinstance(vae, (PixelCodec, VAECodec)):
        return vae
    if hasattr(vae, "encode") and hasattr(vae, "config") and hasattr(vae.config, "latent_channels"):
        return VAECodec(vae)
    raise TypeError(f"expected a PixelCodec, VAECodec or diffusers AutoencoderKL, got {type(vae).__name__}")


def token_width(codec: Codec) -> int:
    """Width of a packed latent token (64 for FLUX's VAE, 3·s²·4 for the pixel codec)."""
    return 4 * as_codec(codec).latent_channels


def mask_width(codec: Codec) -> int:
    """Width of a packed Fill-mask token (256 for FLUX's VAE: 8×8 pixels × 2×2 patch)."""
    return 4 * as_codec(codec).scale_factor ** 2


def patch_size(codec: Codec) -> int:
    """Pixels per token side: the codec's factor times the 2×2 packing."""
    return 2 * as_codec(codec).scale_factor


def check_image_size(codec: Codec, height: int, width: int, what: str = "image") -> None:
    p = patch_size(codec)
    if height % p or width % p:
        raise Vis2IRError(f"{what}: size {height}×{width} must be a multiple of {p} for this codec")


# ----------------------------------------------------------------------------------------------
# Packing


def pack(latents: torch.Tensor) -> torch.Tensor:
    """`[B, C, h, w]` → `[B, (h/2)(w/2), 4C]` by 2×2 patches, channel-major inside a token."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack` for a latent grid of `height × width` (latent pixels, not tokens)."""
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // 2, w=width // 2, ph=2, pw=2)


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """FLUX position ids `[h·w, 3]` = (0, row, col) for a `height × width` token grid."""
    rows = torch.arange(height, device=device, dtype=dtype)
    cols = torch.arange(width, device=device, dtype=dtype)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.cat([torch.zeros_like(grid[:, :1]), grid], dim=-1)


def token_grid(codec: Codec, height: int, width: int) -> tuple[int, int]:
    """Token rows and columns for an image of `height × width` pixels."""
    p = patch_size(codec)
    return height // p, width // p


def fold_mask(mask: torch.Tensor, codec: Codec) -> torch.Tensor:
    """Pixel mask `[B, 1, H, W]` or `[B, H, W]` → packed mask tokens `[B, N, 4·s²]` (as FLUX Fill)."""
    s = as_codec(codec).scale_factor
    if mask.ndim == 4:
        mask = mask[:, 0]
    folded = rearrange(mask, "b (h s1) (w s2) -> b (s1 s2) h w", s1=s, s2=s)
    return pack(folded)


# ----------------------------------------------------------------------------------------------
# Encoding


def encode_images(vae, images: torch.Tensor, generator: torch.Generator | None = None):
    """Images `[B, 3, H, W]` in [0, 1] → `(tokens [B, N, 4C], img_ids [N, 3])`."""
    codec = as_codec(vae)
    check_image_size(codec, images.shape[-2], images.shape[-1])
    latents = codec.encode(images * 2 - 1, generator=generator)
    tokens = pack(latents)
    ids = image_ids(latents.shape[-2] // 2, latents.shape[-1] // 2, device=images.device)
    return tokens, ids


def mask_canvas(canvas: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """FLUX Fill's masked image, in [0, 1]: mid-grey (0 in the codec's [-1, 1]) where `mask` is 1."""
    return canvas * (1 - mask) + 0.5 * mask


def fill_condition(masked_tokens: torch.Tensor, mask: torch.Tensor, codec: Codec) -> torch.Tensor:
    """Masked-canvas tokens + the folded mask → `x_cond [B, N, 4C + 4s²]`, as
    `FluxFillPipeline.prepare_mask_latents` builds it."""
    return torch.cat([masked_tokens, fold_mask(mask.to(masked_tokens.dtype), codec)], dim=-1)


def encode_fill_condition(vae, canvas: torch.Tensor, mask: torch.Tensor, generator=None):
    """The Fill condition `x_cond [B, N, 4C + 4s²]` and `img_ids [N, 3]` for a canvas and its mask."""
    codec = as_codec(vae)
    if mask.ndim == 3:
        mask = mask[:, None]
    check_image_size(codec, canvas.shape[-2], canvas.shape[-1], "canvas")
    masked, ids = encode_images(codec, mask_canvas(canvas, mask), generator=generator)
    return fill_condition(masked, mask, codec), ids


def encode_images_fill(vae, canvas: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None):
    """The FLUX Fill inputs for a canvas and its mask (1 = generate here).

    Returns `x_0 [B, N, 4C]` (the whole canvas), `x_cond [B, N, 4C + 4s²]` and `img_ids [N, 3]`.
    With a generator, the two encodings draw posterior samples from it in turn (as
    FluxFillPipeline does); without one, both posterior modes come from a single codec call.
    """
    if generator is not None:
        x_0, _ = encode_images(vae, canvas, generator=generator)
        x_cond, ids = encode_fill_condition(vae, canvas, mask, generator=generator)
        return x_0, x_cond, ids
    if mask.ndim == 3:
        mask = mask[:, None]
    tokens, ids = encode_images(vae, torch.cat([canvas, mask_canvas(canvas, mask)]))
    x_0, masked = tokens.chunk(2)
    return x_0, fill_condition(masked, mask, as_codec(vae)), ids


def decode_tokens(vae, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Packed tokens → images `[B, 3, height, width]` in [0, 1]."""
    codec = as_codec(vae)
    s = codec.scale_factor
    images = codec.decode(unpack(tokens, height // s, width // s))
    return ((images.float() + 1) / 2).clamp(0, 1)
