"""A batch of triptychs → (prediction, flow-matching target), for any semantic mode.

`Vis2IRModel` composes the backbone (transformer, codec, prompt embeddings) with the semantic
conditioning of docs/design.md §5. Its three steps are used by training and sampling alike:

    encode(batch)                    → Encoded: x_0, x_cond, context, semantic tokens, ids (codec, no grad)
    velocity(x_t, encoded, t, g)     → v̂                                           (adapter + transformer)
    forward(batch, t, noise)         → Prediction(pred = v̂, target = noise − x_0)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch

from vis2ir.backbone import Backbone, load_backbone
from vis2ir.backbones import SPECS, BackboneSpec, Encoded
from vis2ir.config import Config, SemanticConfig
from vis2ir.errors import Vis2IRError
from vis2ir.latents import parameter_dtype, token_grid, token_width
from vis2ir.objective import interpolate, velocity_target
from vis2ir.semantic.adapter import SemanticConditioningAdapter
from vis2ir.semantic.modes import target_tokens, widen_x_embedder

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_batch(codec, semantic_cfg: SemanticConfig, visible: torch.Tensor, infrared: torch.Tensor | None = None,
                 semantic: torch.Tensor | None = None, generator=None, spec: BackboneSpec = SPECS["flux1-fill"]
                 ) -> Encoded:
    """Images in [0, 1] `[B, 3, H, W]` → the latent inputs of the backbone `spec` and the mode, with the codec
    alone (`vis2ir.backbones.encode_fill`, `encode_with_reference`). `infrared` is None when sampling (`x_0` None)."""
    return spec.encode(codec, semantic_cfg, visible, infrared, semantic, generator)


@dataclass
class Conditioning:
    """The transformer's inputs besides x_t and t for one batch (`Vis2IRModel.conditioning`): they do not
    change across sampling steps, so sampling computes them once per image."""

    rest: torch.Tensor               # [B, N, C'] the channels after x_t: x_cond (adapted) (+ semantic tokens)
    context: torch.Tensor | None     # [B, M, 4C] tokens after x_t's along the sequence (Kontext's reference)
    guidance: torch.Tensor | None    # [B] float32, or None when the transformer has no guidance embedding
    pooled: torch.Tensor | None      # [B, P] pooled prompt embedding, in the transformer's dtype (None: FLUX.2)
    prompt: torch.Tensor             # [B, L, D] prompt embeddings
    txt_ids: torch.Tensor            # [L, 3] zeros (FLUX.2: [L, 4], (0, 0, 0, l))
    attention: list | None = None    # the adapter's attention per layer [B, heads, N, N] (condition injection)
    negative: torch.Tensor | None = None  # [B, L, D] the empty prompt's embeddings when true CFG runs, else None
    cfg_scale: float = 1.0           # true CFG: v̂ = v̂(∅) + cfg_scale·(v̂(prompt) − v̂(∅))


class Prediction(NamedTuple):
    pred: torch.Tensor    # v̂ [B, N, 4C]
    target: torch.Tensor  # x_1 − x_0


class Vis2IRModel(torch.nn.Module):
    """A FLUX transformer (the backbone `spec`: FLUX.1 Fill or Kontext, FLUX.2 klein) + semantic conditioning, on one
    codec."""

    def __init__(self, backbone: Backbone, semantic: SemanticConfig, seed: int = 0):
        super().__init__()
        self.spec = spec = backbone.spec
        self.transformer = backbone.transformer
        self.codec = backbone.codec
        self.semantic = semantic
        self.mode = semantic.mode
        self.register_buffer("prompt_embeds", backbone.prompt.prompt_embeds, persistent=False)
        self.register_buffer("pooled_prompt_embeds", backbone.prompt.pooled_prompt_embeds, persistent=False)
        self.register_buffer("negative_prompt_embeds", backbone.prompt.negative_prompt_embeds, persistent=False)
        self.distilled = backbone.distilled  # a step-distilled checkpoint ignores guidance (klein)
        width = token_width(self.codec)
        if self.mode not in spec.modes:  # the settings refuse it first (`ModelConfig._check_kontext`)
            raise Vis2IRError(f"model.semantic.mode={self.mode} is not yet supported with model.backbone={spec.name} "
                              f"(supported: {', '.join(spec.modes)})")

        if self.mode == "channel_concat":
            widen_x_embedder(self.transformer, width)
        expected = spec.in_channels(self.codec) + (width if self.mode == "channel_concat" else 0)
        got = self.transformer.config.in_channels
        if got != expected:
            raise Vis2IRError(f"the transformer takes {got} input channels, but mode {self.mode} with this codec "
                              f"feeds {expected} to {spec.title} (check model.backbone, model.codec, "
                              "model.pixel_factor and model.semantic.mode)")

        self.adapter = None
        if self.mode == "cross_attention":
            with torch.random.fork_rng(devices=[]):  # the same adapter for the same seed, every build
                torch.manual_seed(seed + 1)
                self.adapter = SemanticConditioningAdapter(
                    dim=width, num_layers=semantic.num_layers, num_heads=semantic.num_heads, dropout=semantic.dropout,
                    position=semantic.position, scale_init=semantic.scale_init,
                    rope_min_wavelength=semantic.rope_min_wavelength, rope_max_wavelength=semantic.rope_max_wavelength,
                ).to(device=self.prompt_embeds.device)
        self._log_setup()

    def _log_setup(self) -> None:
        if self.mode == "none":
            log.info("Semantic conditioning DISABLED (mode: none)")
            return
        log.info("Semantic conditioning ENABLED")
        log.info("Semantic mode: %s", self.mode)
        if self.adapter is not None:
            s = self.semantic
            n = self.adapter.num_parameters
            log.info("Using Cross-Attention with %d layers, %d heads", s.num_layers, s.num_heads)
            log.info("Semantic cross-attention: %d parameters (%d per layer), position=%s, inject_into=%s",
                     n, n // s.num_layers, s.position, s.inject_into)
        if self.mode == "channel_concat":
            log.info("x_embedder widened to %d input channels (new columns zero)", self.transformer.config.in_channels)

    # ------------------------------------------------------------------------------------------

    def encode(self, visible: torch.Tensor, infrared: torch.Tensor | None = None,
               semantic: torch.Tensor | None = None, generator=None) -> Encoded:
        """Images in [0, 1] `[B, 3, H, W]` → the latent inputs (see `encode_batch`)."""
        return encode_batch(self.codec, self.semantic, visible, infrared, semantic, generator, self.spec)

    def conditioning(self, enc: Encoded, guidance: float | torch.Tensor = 1.0, return_attention: bool = False,
                     adapter_scale: float | None = None, true_cfg: bool = False) -> Conditioning:
        """What the transformer reads besides x_t and t, computed once per batch: sampling reuses it at
        every step. Runs the adapter when it acts on the clean condition (`inject_into: condition`).
        `true_cfg` (sampling): on a backbone whose spec has it, a checkpoint that is not step-distilled and a
        guidance > 1, `predict` runs classifier-free guidance against the empty prompt, as stock
        `Flux2KleinPipeline.do_classifier_free_guidance`; training never does."""
        dtype = parameter_dtype(self.transformer)
        b = enc.x_cond.shape[0]
        cond, attention = enc.x_cond, None
        if self.adapter is not None and self.semantic.inject_into == "condition":
            w = token_width(self.codec)
            adapted, attention = self._adapt(cond[..., :w], enc, return_attention, adapter_scale)
            cond = torch.cat([adapted.to(cond.dtype), cond[..., w:]], dim=-1)
        parts = [cond.to(dtype)]
        if self.mode == "channel_concat":
            parts.append(enc.semantic_tokens.to(dtype))
        device = enc.x_cond.device
        g = None
        if self.transformer.config.guidance_embeds:  # filled on the device: no host-to-device copy
            g = guidance.to(device, torch.float32).expand(b) if torch.is_tensor(guidance) else \
                torch.full((b,), float(guidance), device=device, dtype=torch.float32)
        negative, scale = None, 1.0
        if true_cfg and self.spec.true_cfg and not self.distilled and not torch.is_tensor(guidance) and guidance > 1:
            negative, scale = self.negative_prompt_embeds.to(dtype).expand(b, -1, -1), float(guidance)
        return Conditioning(
            rest=torch.cat(parts, dim=-1), guidance=g,
            context=self._context(enc, dtype),
            pooled=self.pooled_prompt_embeds.to(dtype).expand(b, -1) if self.spec.pooled else None,
            prompt=self.prompt_embeds.to(dtype).expand(b, -1, -1),
            txt_ids=self.spec.text_ids(self.prompt_embeds.shape[1], device=self.prompt_embeds.device),
            attention=attention, negative=negative, cfg_scale=scale)

    def _context(self, enc: Encoded, dtype: torch.dtype) -> torch.Tensor | None:
        """The tokens after x_t's along the sequence `[B, M, C]` (Kontext's reference), None without: with
        channel_concat, the map's tokens join them as they join x_t's (the map is pixel-aligned with both)."""
        if enc.context is None:
            return None
        if self.mode == "channel_concat":
            return torch.cat([enc.context, enc.semantic_tokens.to(enc.context.dtype)], dim=-1).to(dtype)
        return enc.context.to(dtype)

    def _adapt(self, base: torch.Tensor, enc: Encoded, return_attention: bool, adapter_scale: float | None):
        """The adapter on `base` `[B, N, w]` in fp32 (it is small) → (adapted, attention or None)."""
        base = base.float()
        adapted = self.adapter(base, enc.semantic_tokens.float(), enc.img_ids.float(),
                               return_attention=return_attention)
        adapted, attention = adapted if return_attention else (adapted, None)
        if adapter_scale is not None and adapter_scale != 1:
            adapted = base + adapter_scale * (adapted - base)
        return adapted, attention

    def predict(self, x_t: torch.Tensor, enc: Encoded, cond: Conditioning, t: torch.Tensor,
                return_attention: bool = False, adapter_scale: float | None = None):
        """v̂ `[B, N, 4C]` for noisy tokens `x_t` at flow time `t` (`[B]`, in [0, 1]) with the batch's
        `conditioning`; with `return_attention`, also the adapter's attention per layer (or None)."""
        dtype = parameter_dtype(self.transformer)
        b = x_t.shape[0]
        x_in, attention = x_t, cond.attention
        if self.adapter is not None and self.semantic.inject_into == "noisy":
            x_in, attention = self._adapt(x_t, enc, return_attention, adapter_scale)
        hidden, ids = torch.cat([x_in.to(dtype), cond.rest], dim=-1), enc.img_ids
        if cond.context is not None:  # Kontext: the reference after the target, along the sequence
            hidden, ids = torch.cat([hidden, cond.context], dim=1), torch.cat([ids, enc.context_ids], dim=0)
        kwargs = dict(hidden_states=hidden, timestep=t.to(device=x_t.device, dtype=dtype).expand(b),
                      guidance=cond.guidance, txt_ids=cond.txt_ids, img_ids=ids, return_dict=False)
        if cond.pooled is not None:  # FLUX.1's CLIP embedding (FLUX.2 has none)
            kwargs["pooled_projections"] = cond.pooled
        n = x_t.shape[1]
        out = self.transformer(encoder_hidden_states=cond.prompt, **kwargs)[0][:, :n]  # the target slice
        if cond.negative is not None:  # true CFG, as Flux2KleinPipeline: a second pass on the empty prompt
            uncond = self.transformer(encoder_hidden_states=cond.negative, **kwargs)[0][:, :n]
            out = uncond + cond.cfg_scale * (out - uncond)
        return (out, attention) if return_attention else out

    def velocity(self, x_t: torch.Tensor, enc: Encoded, t: torch.Tensor, guidance: float | torch.Tensor = 1.0,
                 return_attention: bool = False, adapter_scale: float | None = None):
        """v̂ for noisy tokens `x_t` at flow time `t ∈ [0, 1]` (`[B]`); optionally the adapter's attention.

        `adapter_scale` multiplies the adapter's residual (None or 1: as trained, 0: off). One call of
        `conditioning` and `predict` (training: the adapter runs in every step, with its gradients).
        """
        cond = self.conditioning(enc, guidance, return_attention, adapter_scale)
        return self.predict(x_t, enc, cond, t, return_attention, adapter_scale)

    def forward(self, visible: torch.Tensor, infrared: torch.Tensor, semantic: torch.Tensor | None,
                t: torch.Tensor, noise: torch.Tensor | None = None, guidance: float = 1.0,
                encoded: Encoded | None = None) -> Prediction:
        """Flow matching (`vis2ir.objective`): x_t = (1 − t)·x_0 + t·x_1; returns v̂ and the target x_1 − x_0."""
        enc = encoded or self.encode(visible, infrared, semantic)
        x_0 = enc.x_0.to(parameter_dtype(self.transformer))
        noise = torch.randn_like(x_0) if noise is None else noise.to(x_0.dtype)
        x_t = interpolate(x_0, noise, t)
        return Prediction(self.velocity(x_t, enc, t, guidance), velocity_target(x_0, noise))

    def target_tokens(self, enc: Encoded) -> torch.Tensor:
        """Boolean `[N]` mask of the tokens that belong to the infrared panel (all of them without a canvas)."""
        rows, cols = token_grid(self.codec, enc.height, enc.width)
        if not self.spec.canvas:
            return torch.ones(rows * cols, dtype=torch.bool, device=enc.x_0.device)
        return target_tokens(self.mode, rows, cols, device=enc.x_0.device)


def build_model(cfg: Config, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Vis2IRModel:
    """The model a config describes, with base weights (pretrained or random) and no training."""
    return Vis2IRModel(load_backbone(cfg.model, device, dtype), cfg.model.semantic, seed=cfg.model.seed)
