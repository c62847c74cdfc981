"""The `sample:` and `eval:` sections of the settings, and the defaults of commands that are no settings. Each
field's comment is its meaning (`vis2ir config show`); both sections may change when a run resumes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from vis2ir.config.checks import check, check_seed
from vis2ir.config.roles import RESUMABLE, section_roles

# `evaluate --pred-values`: how 16-bit predictions become [0, 1] (`vis2ir.evaluate.run.prediction_reading`)
PRED_VALUES = ("auto", "full-range", "ir-normalize")

# How long `vis2ir app` keeps results and uploads (minutes), so a long-running page does not fill the disk.
APP_KEEP_MINUTES = 60
# The largest photo or semantic map `vis2ir app` accepts from a visitor (MiB): larger uploads are refused.
APP_MAX_UPLOAD_MIB = 25


@section_roles(RESUMABLE)  # sampling (the validation grids of a run): may change on resume
@dataclass
class SampleConfig:
    """Sampling settings (docs/design.md §1)."""

    steps: int = 28  # denoising steps
    guidance: float = 50.0  # guidance value given to the transformer (FLUX.1 Fill: 30-50; the demo model: 1)
    seed: int = 0  # seed of each image's noise
    adapter_scale: float = 1.0  # the cross-attention adapter's residual: 1 as trained, 0 off (what it adds)
    # Longer side images are generated at: `auto` = a checkpoint's data.size (trained with resize_policy bucket:
    # the input's aspect-ratio bucket; a config-built model: the input's own size), `native` or 0 = the input's
    # own size, or a number of pixels.
    size: int | Literal["auto", "native"] = "auto"
    # diffusers' tiled VAE encode/decode: less memory for large images (a VAE codec only; docs/performance.md)
    vae_tiling: bool = False
    # torch.compile the transformer's repeated blocks (regional compilation): the first image compiles (slow)
    compile: bool = False
    # torch.compile mode: default, or max-autotune-no-cudagraphs (a longer compile; measured no faster on an H200).
    # The modes with CUDA graphs (reduce-overhead, max-autotune) are refused: one graph serves every block in turn,
    # so each block's call would overwrite the previous block's output.
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    # Merge a checkpoint's LoRA into the base weights, fuse each attention's q/k/v projections into one
    # (diffusers' fuse_lora and fuse_projections, layer by layer) and put each MLP's tanh GELU inside its input
    # product (cuBLASLt's GELU epilogue on CUDA) when a pipeline loads a model: the same images within rounding,
    # fewer and larger kernels (docs/performance.md). Not for a quantized base (model.quantize), whose weights
    # stay as they are.
    fuse: bool = True
    # reuse the transformer's work across steps (approximate): none; first_block (diffusers' First-Block-Cache:
    # skip the other blocks while the first block's residual changes less than cache_threshold); taylorseer
    # (diffusers' TaylorSeer, lite: compute every cache_interval-th step, extrapolate the output in between)
    cache: Literal["none", "first_block", "taylorseer"] = "none"
    cache_threshold: float = 0.05  # first_block: relative change of the first block's residual that recomputes
    cache_interval: int = 5  # taylorseer: one computed step every cache_interval steps after the warm-up
    cache_warmup: int = 3  # taylorseer: the first steps always computed
    cache_order: int = 1  # taylorseer: order of the Taylor extrapolation

    def replaced(self, **changes) -> SampleConfig:
        """A validated copy with the settings in `changes` that are not None (one call's steps, seed, ...);
        a bad one is a one-line `ConfigError` naming it (`sample.seed: expected ...`)."""
        copy = dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})
        copy.validate()
        return copy

    def validate(self) -> None:
        check(self.steps >= 1, "sample.steps", "an integer >= 1", self.steps)
        check(self.guidance >= 0, "sample.guidance", "a number >= 0", self.guidance)
        check_seed(self.seed, "sample.seed")
        check(not isinstance(self.size, int) or self.size >= 0, "sample.size", "auto, native or pixels >= 0",
              self.size)
        check(math.isfinite(self.adapter_scale), "sample.adapter_scale", "a finite number", self.adapter_scale)
        check(math.isfinite(self.cache_threshold) and self.cache_threshold >= 0, "sample.cache_threshold",
              "a number >= 0", self.cache_threshold)
        check(self.cache_interval >= 1, "sample.cache_interval", "an integer >= 1", self.cache_interval)
        check(self.cache_warmup >= 1, "sample.cache_warmup", "an integer >= 1", self.cache_warmup)
        check(self.cache_order >= 1, "sample.cache_order", "an integer >= 1", self.cache_order)


@section_roles(RESUMABLE)  # evaluation: no part of a training run, may change on resume
@dataclass
class EvalConfig:
    """`vis2ir evaluate` and `vis2ir ablate` (docs/evaluation.md).

    `fid_weights` / `lpips_weights`: the Inception (`pt_inception-2015-12-05-6726825d.pth`) and
    AlexNet (`alexnet-owt-7be5be79.pth`) weights, a file or a folder holding it (else
    $VIS2IR_FID_WEIGHTS / $VIS2IR_LPIPS_WEIGHTS, else the torch hub cache). A pixel is "hot" above
    the truth image's `hot_percentile`-th percentile. `limit`: test images scored (null: all);
    `fit_limit`: training samples the reference predictors are fitted on. `noise_draws`: a checkpoint
    is sampled with `sample.seed`, `sample.seed + 1`, … and scored over all draws (every image shares
    one draw, so one draw's luck moves the mean PSNR by ~0.5 dB; docs/results.md).
    """

    # Inception weights for FID: a file or a folder holding it (null: $VIS2IR_FID_WEIGHTS, torch hub cache)
    fid_weights: str | None = None
    # AlexNet weights for LPIPS: a file or a folder (null: $VIS2IR_LPIPS_WEIGHTS, torch hub cache)
    lpips_weights: str | None = None
    hot_percentile: float = 90.0  # a pixel is hot above this percentile of its truth image (hallucinated-heat metric)
    batch_size: int = 8  # images per batch when generating for evaluation
    limit: int | None = None  # test images scored (null: all)
    fit_limit: int = 400  # training samples the reference predictors are fitted on
    noise_draws: int = 1  # draws of noise per image (seeds sample.seed, +1, ...), scored over all

    def validate(self) -> None:
        check(0.0 < self.hot_percentile < 100.0, "eval.hot_percentile", "a number in (0, 100)",
              self.hot_percentile)
        check(self.batch_size >= 1, "eval.batch_size", "an integer >= 1", self.batch_size)
        check(self.limit is None or self.limit >= 1, "eval.limit", "an integer >= 1 (or null: all)", self.limit)
        check(self.fit_limit >= 1, "eval.fit_limit", "an integer >= 1", self.fit_limit)
        check(self.noise_draws >= 1, "eval.noise_draws", "an integer >= 1", self.noise_draws)
