"""The base models vis2ir trains, as one table of specs (`SPECS`, as black-forest-labs/flux keeps its `configs`).

A spec says how a backbone differs from the others, and nothing else; `model.py`, `sample.py` and `backbone.py`
read their differences from it:

    encode         photo (+ map, + infrared when training) → `Encoded`: the target tokens x_0, the condition
                   along the channels (`x_cond`) or along the sequence (`context`), the position ids
    in_channels    the transformer's input width for a codec (semantic mode none)
    canvas         whether the photo and the target share one canvas (Fill's diptych), so the noise, the
                   decode and the schedule's token count cover the whole canvas; else they cover the target only
    posterior      whether sampling draws posterior samples of the canvas (Fill) or takes the mode (Kontext)
    family         which transformer, codec and text encoders (`backbone.PARTS`): FLUX.1's or FLUX.2's
    noise, mu      the initial noise's shape and packing; the schedule's shift for a token and step count
    text_ids       the prompt tokens' position ids (FLUX.1: zeros over 3 axes; FLUX.2: (0, 0, 0, l))

FLUX.1 Fill (`flux1-fill`): the canvas [photo | blank] and its mask enter channel-wise, `[x_t ‖ masked canvas ‖
mask]` (diffusers `FluxFillPipeline`). FLUX.1 Kontext (`flux1-kontext`): the photo's tokens are appended after
the target's along the sequence, ids (1, row, col) beside the target's (0, row, col), and only the target slice
of the output is the prediction (diffusers 0.42 `FluxKontextPipeline`, `_auto_resize=False`; facts in
/work/notes/kontext/PLAN.md §2). FLUX.2 [klein] (`flux2-klein`): the photo's tokens after the target's as with
Kontext, with FLUX.2's codec, four-axis ids, Qwen3 prompt and true classifier-free guidance (`vis2ir.klein`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import repeat

from vis2ir import klein
from vis2ir.latents import (Codec, encode_fill_condition, encode_images, encode_images_fill, image_ids, mask_width,
                            pack, token_grid, token_width)
from vis2ir.errors import Vis2IRError
from vis2ir.io.inputs import missing_maps_help
from vis2ir.semantic.modes import NEEDS_SEMANTIC, SEMANTIC_TOKEN_MODES, build_canvas, num_panels


@dataclass
class Encoded:
    """The latent-side inputs of one batch (cacheable: they do not depend on t or the noise)."""

    x_0: torch.Tensor | None               # [B, N, 4C]   packed target latents: Fill's whole canvas (None: sampling)
    x_cond: torch.Tensor                   # [B, N, C'] channel-wise condition: Fill's masked canvas + mask; Kontext [B, N, 0]
    img_ids: torch.Tensor                  # [N, 3] ids of the N target tokens ([N, 4] for FLUX.2)
    semantic_tokens: torch.Tensor | None   # [B, N, 4C] for cross_attention / channel_concat (Fill: [map | map])
    height: int                            # size in pixels of what x_0 covers (Fill: the canvas)
    width: int
    context: torch.Tensor | None = None      # [B, M, 4C] reference tokens appended along the sequence (Kontext)
    context_ids: torch.Tensor | None = None  # [M, 3] their ids ([M, 4] for FLUX.2)


@torch.no_grad()
def encode_fill(codec: Codec, semantic_cfg, visible: torch.Tensor, infrared: torch.Tensor | None = None,
                semantic: torch.Tensor | None = None, generator=None) -> Encoded:
    """FLUX.1 Fill: images in [0, 1] `[B, 3, H, W]` → the canvas's latent inputs for the semantic mode.

    `infrared` is None when sampling: the target panel is blank and `x_0` is None. With a generator (or one
    per image), the canvas and the masked canvas take posterior samples from it in that order, as
    FluxFillPipeline draws them; otherwise both take the posterior mode from one codec call. The semantic
    tokens are `[semantic | semantic]`: the map describes both pixel-aligned halves (docs/design.md §4.1)."""
    canvas, mask = build_canvas(semantic_cfg.mode, visible, infrared, semantic, semantic_cfg.fusion_alpha)
    dtype = codec.dtype
    canvas, mask = canvas.to(dtype), mask.to(dtype)
    if infrared is not None:
        x_0, x_cond, ids = encode_images_fill(codec, canvas, mask, generator=generator)
    else:
        x_0, (x_cond, ids) = None, encode_fill_condition(codec, canvas, mask, generator=generator)
    sem = None
    if semantic_cfg.mode in SEMANTIC_TOKEN_MODES:
        panel, _ = encode_images(codec, semantic.to(dtype))
        rows, _ = token_grid(codec, semantic.shape[-2], semantic.shape[-1])
        sem = repeat(panel, "b (r c) d -> b (r n c) d", r=rows, n=2)
    return Encoded(x_0, x_cond, ids, sem, canvas.shape[-2], canvas.shape[-1])


def stock_layout(images: torch.Tensor) -> torch.Tensor:
    """`images` `[B, 3, H, W]` copied into channels-last memory with canonical strides `(3HW, 1, 3W, 3)`, the
    layout diffusers' `VaeImageProcessor` hands to the VAE (`from_numpy(nhwc.transpose(0, 3, 1, 2))`). CPU
    convolutions round differently per layout (an NCHW copy moved the latents by up to 1.3e-6); with this the
    encode equals stock's bit for bit. `.contiguous(memory_format=channels_last)` is not enough: a batch-1
    NCHW tensor made by a permute may count as channels-last already and come back unchanged."""
    return torch.empty_like(images, memory_format=torch.channels_last).copy_(images)


def with_index(ids: torch.Tensor, index: int) -> torch.Tensor:
    """Ids `[N, 3]` with the first axis set to `index` (0: the target, 1: Kontext's reference image)."""
    ids = ids.clone()
    ids[:, 0] = index
    return ids


@torch.no_grad()
def encode_with_reference(codec: Codec, semantic_cfg, visible: torch.Tensor, infrared: torch.Tensor | None = None,
                          semantic: torch.Tensor | None = None, generator=None, *,
                          ids: Callable[..., torch.Tensor], reference_index: int) -> Encoded:
    """The backbones that take the photo as a reference image (FLUX.1 Kontext, FLUX.2 klein): photo (and
    infrared), map `[B, 3, H, W]` in [0, 1] → target and reference tokens.

    x_0: the infrared photo's posterior-mode tokens `[B, N, 4C]` (None when sampling), ids `ids(rows, cols, 0,
    device)`; the reference (`context`): the photo's posterior-mode tokens, ids `ids(rows, cols,
    reference_index, device)` on the same grid (stock `retrieve_latents(sample_mode="argmax")`: no draw, so
    `generator` is not used). Modes: `none` (stock); `pixel_fusion`: the reference is `(1 − α)·photo + α·map`;
    `channel_concat`: the map's tokens `[B, N, 4C]` (pixel-aligned with both target and reference) in
    `semantic_tokens`, joined to both along the channels by `Vis2IRModel.conditioning`. Other modes are refused
    by the settings (`ModelConfig._check_kontext`, `_check_klein`)."""
    mode = semantic_cfg.mode
    if mode in NEEDS_SEMANTIC and semantic is None:
        raise Vis2IRError(f"model.semantic.mode={mode} needs a semantic map for every image, and none was given; "
                          + missing_maps_help())
    dtype = codec.dtype
    if mode == "pixel_fusion":
        visible = (1 - semantic_cfg.fusion_alpha) * visible + semantic_cfg.fusion_alpha * semantic
    ref, _ = encode_images(codec, stock_layout(visible.to(dtype)))
    x_0 = None if infrared is None else encode_images(codec, stock_layout(infrared.to(dtype)))[0]
    sem = encode_images(codec, semantic.to(dtype))[0] if mode in SEMANTIC_TOKEN_MODES else None
    rows, cols = token_grid(codec, visible.shape[-2], visible.shape[-1])
    empty = ref.new_zeros(*ref.shape[:2], 0)
    return Encoded(x_0, empty, ids(rows, cols, 0, visible.device), sem, visible.shape[-2], visible.shape[-1], ref,
                   ids(rows, cols, reference_index, visible.device))


def kontext_ids(rows: int, cols: int, index: int, device=None) -> torch.Tensor:
    """FLUX.1 Kontext's ids `[rows·cols, 3]` = (index, row, col): the target 0, the reference 1 (stock)."""
    return with_index(image_ids(rows, cols, device=device), index)


KONTEXT_REFERENCE_INDEX = 1


def flux1_noise_shape(codec: Codec, height: int, width: int) -> tuple[int, int, int]:
    """One image's initial noise for FLUX.1: `(C, H/s, W/s)` latents, packed 2×2 (stock `prepare_latents`)."""
    s = codec.scale_factor
    return codec.latent_channels, height // s, width // s


def get_lin_function(x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15):
    """The line through (x1, y1) and (x2, y2): FLUX.1's shift `mu` for a sequence length."""
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: x * m + b


def flux1_mu(seq_len: int, steps: int) -> float:
    """FLUX.1's schedule shift: `lerp(seq_len; 256→0.5, 4096→1.15)`, whatever the step count (`calculate_shift`)."""
    return get_lin_function()(seq_len)


def flux1_text_ids(length: int, device=None) -> torch.Tensor:
    """FLUX.1's prompt ids `[length, 3]`: zeros."""
    return torch.zeros(length, 3, device=device)


@dataclass(frozen=True)
class BackboneSpec:
    """How one base model differs from the others (see the module docstring)."""

    name: str                      # model.backbone
    title: str                     # for messages
    hub_id: str                    # the weights on the Hugging Face Hub (model.flux_path's usual value)
    licence: str                   # as the model card states it
    pipeline: str                  # the diffusers pipeline whose folder layout model.flux_path holds
    encode: Callable[..., Encoded]
    sequence_condition: bool       # the condition enters along the sequence (the prediction is the first N tokens)
    canvas: bool                   # the photo and the target share one canvas (noise, schedule, decode cover it)
    posterior_draws: bool          # sampling draws posterior samples (of the canvas) besides the noise
    modes: tuple[str, ...]         # the semantic modes it supports
    family: str = "flux1"          # the parts' family (`backbone.PARTS`)
    gated: bool = True             # the Hub repository asks users to accept its licence first
    pooled: bool = True            # the transformer takes a pooled prompt embedding (FLUX.1's CLIP)
    true_cfg: bool = False         # guidance > 1 runs classifier-free guidance against the empty prompt
    noise_shape: Callable[[Codec, int, int], tuple[int, int, int]] = flux1_noise_shape
    pack_noise: Callable[[torch.Tensor], torch.Tensor] = pack
    mu: Callable[[int, int], float] = flux1_mu
    text_ids: Callable[..., torch.Tensor] = flux1_text_ids

    def in_channels(self, codec: Codec) -> int:
        """The transformer's input width for `codec` in semantic mode none: Fill's noisy + masked-canvas latents
        + mask (2·64 + 256 = 384 with FLUX's VAE); Kontext's noisy latents alone (64); klein's (128)."""
        return token_width(codec) if self.sequence_condition else 2 * token_width(codec) + mask_width(codec)

    def sequence_panels(self, mode: str) -> int:
        """Image tokens in the transformer's sequence, in target panels: Fill's canvas (2, or 3 for in_context);
        Kontext's and klein's target and reference (2)."""
        return num_panels(mode) if self.canvas else 2


FLUX_DEV_LICENCE = "FLUX.1 [dev] non-commercial licence"  # both model cards; the Hub repos are gated
# black-forest-labs/flux2 README, "Model Overview": FLUX.2 [klein] 4B Base apache-2.0 (the 9B ones: FLUX
# Non-Commercial License); see the model card of the weights you use.
KLEIN_LICENCE = "Apache-2.0 licence (4B; the 9B klein models are under the FLUX Non-Commercial License)"
SPECS: dict[str, BackboneSpec] = {
    "flux1-fill": BackboneSpec(
        "flux1-fill", "FLUX.1 Fill", "black-forest-labs/FLUX.1-Fill-dev", FLUX_DEV_LICENCE, "FluxFillPipeline",
        encode_fill, sequence_condition=False, canvas=True, posterior_draws=True,
        modes=("none", "pixel_fusion", "cross_attention", "in_context", "channel_concat")),
    "flux1-kontext": BackboneSpec(
        "flux1-kontext", "FLUX.1 Kontext", "black-forest-labs/FLUX.1-Kontext-dev", FLUX_DEV_LICENCE,
        "FluxKontextPipeline", functools.partial(encode_with_reference, ids=kontext_ids,
                                                 reference_index=KONTEXT_REFERENCE_INDEX), sequence_condition=True, canvas=False, posterior_draws=False,
        modes=("none", "pixel_fusion", "channel_concat")),
    "flux2-klein": BackboneSpec(
        "flux2-klein", "FLUX.2 klein", "black-forest-labs/FLUX.2-klein-base-4B", KLEIN_LICENCE,
        "Flux2KleinPipeline", functools.partial(encode_with_reference, ids=klein.image_ids,
                                                reference_index=klein.REFERENCE_INDEX), sequence_condition=True, canvas=False, posterior_draws=False,
        modes=("none", "pixel_fusion", "channel_concat"), family="flux2", gated=False, pooled=False, true_cfg=True,
        noise_shape=klein.noise_shape, pack_noise=klein.pack_noise, mu=klein.empirical_mu,
        text_ids=klein.text_ids),
}


def spec_of(name: str) -> BackboneSpec:
    """The spec of `model.backbone` = `name` (validated settings hold only names in `SPECS`)."""
    return SPECS[name]
