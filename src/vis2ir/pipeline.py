"""The Python API: `Vis2IRPipeline`, visible (+ semantic) images in, infrared images out.

    pipe = Vis2IRPipeline.from_checkpoint("runs/demo", device="cuda")
    out = pipe(read_image("scene.png"), semantic=read_image("scene_semantic.png"), seed=0)  # vis2ir.io.images
    out.images[0].save("scene_ir.png")

Images of any size go in: each is resized for the model (bicubic; semantic maps nearest, so their
colours stay exact) and the infrared comes back at the input's size. The model's size (`size`, else
`sample.size`): `auto` is the panel size a checkpoint was trained at (`data.size` as the longer side; with
`data.resize_policy: bucket`, the input's aspect-ratio bucket, as training resized it)
and the input's own size for a model built from a config; `native` (or 0) the input's own size; a
number, the longer side. Either way each side is rounded to a multiple of the codec's patch size.
A size with more than `OVERSIZE` times the pixels of the trained panel is warned about once per pipeline,
with the time it will take (`size_warning`).
16-bit and float inputs are normalised as in training (`data.ir_normalize`). An image whose output is
not finite (a broken model) raises `NonFiniteOutput`, which carries the other images. Every image
is sampled with its own generator seeded with `seed`, so its result does not depend on its batch,
and with mode `none` (or adapter scale 0) it equals stock `FluxFillPipeline` with
`generator=torch.Generator("cpu").manual_seed(seed)`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vis2ir.backbone import resolve_dtype
from vis2ir.checkpoint import check_compatible, find_checkpoint, load_checkpoint_config, load_model
from vis2ir.config import Config, load_config
from vis2ir.data.buckets import bucket_shapes, nearest_bucket
from vis2ir.errors import Vis2IRError
from vis2ir.io.images import Normaliser, rgb_image, same_aspect, to_tensor, wxh
from vis2ir.io.inputs import missing_maps_help
from vis2ir.io.runtime import default_device
from vis2ir.latents import VAECodec, patch_size, token_grid
from vis2ir.model import Vis2IRModel, build_model
from vis2ir.palette import semantic_problem
from vis2ir.quantize import out_of_memory
from vis2ir.sample import generate
from vis2ir.semantic.modes import NEEDS_SEMANTIC, num_panels, unknown_maps
from vis2ir.speedup import StepCache, compile_blocks, compile_failure, fuse_for_sampling
from vis2ir.visualize import AttentionMaps

log = logging.getLogger(__name__)

OFFLOAD = ("none", "model", "sequential")
OVERSIZE = 4  # warn when images are generated at more than this many times the trained panel's pixels


# ----------------------------------------------------------------------------------------------
# Images in and out


def model_size(height: int, width: int, patch: int, size: int | None = None) -> tuple[int, int]:
    """The model's image size: each side rounded to a multiple of `patch` (at least one patch); with
    `size`, the longer side is first scaled to `size` (aspect kept)."""
    if size is not None:
        scale = size / max(height, width)
        height, width = height * scale, width * scale
    return tuple(max(patch, int(round(s / patch)) * patch) for s in (height, width))


def resize(images: torch.Tensor, size: tuple[int, int], exact: bool = False) -> torch.Tensor:
    """`[B, 3, H, W]` to `size`: bicubic with antialiasing, or nearest with `exact` (semantic maps)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if exact:
        return F.interpolate(images, size=size, mode="nearest-exact")
    return F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def to_output(image: torch.Tensor, output_type: str):
    """Infrared `[3, H, W]` in [0, 1] → an 8-bit grey PIL image, a float array `[H, W]`, or the tensor."""
    if output_type == "pt":
        return image
    grey = image.float().mean(0).numpy()
    if output_type == "np":
        return grey
    return Image.fromarray(np.round(grey * 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class Vis2IROutput:
    images: list                                  # PIL images, arrays or tensors, at the inputs' sizes
    attention: list[AttentionMaps] | None = None  # one per image, with `return_attention`


class NonFiniteOutput(Vis2IRError):
    """The infrared of some images came out NaN or inf (broken weights). `bad`: their indices;
    `output`: the result of the call, with None in their places."""

    def __init__(self, bad: list[int], output: Vis2IROutput):
        super().__init__(f"{'image' if len(bad) == 1 else 'images'} {', '.join(map(str, bad))}: {NOT_FINITE}")
        self.bad, self.output = bad, output


NOT_FINITE = ("the model's output is not finite (NaN/inf), so no image is written; the weights are probably "
              "broken (e.g. trained through NaN losses: see the training log)")


class Vis2IRPipeline:
    """Visible (+ semantic) images → infrared images, with a `Vis2IRModel` and its config."""

    def __init__(self, model: Vis2IRModel, cfg: Config, device: str | torch.device | None = None):
        self.model = model.eval()
        self.cfg = cfg
        self.device = default_device(device) if device is not None else model.prompt_embeds.device
        self.normaliser = Normaliser.of(cfg.data)  # 16-bit / float inputs, as the data loader reads them
        self.trained_size: int | None = None  # a checkpoint's panel size (data.size): sample.size=auto
        self.trained_buckets: list | None = None  # a checkpoint's aspect-ratio buckets: sample.size=auto uses them
        self._hooks: list = []
        if cfg.sample.vae_tiling and isinstance(model.codec, VAECodec):
            model.codec.vae.enable_tiling()  # diffusers' tiled encode/decode: less memory on large images
        self.step_cache: StepCache | None = None  # `sample.cache`, counting over the calls with these settings
        self._compile_pending = False
        self._size_warned = False  # `size_warning` logged (once per pipeline)
        if cfg.sample.compile:
            self.compile(cfg.sample.compile_mode)

    def compile(self, mode: str = "default") -> Vis2IRPipeline:
        """`torch.compile` the transformer's blocks (`sample.compile`; `speedup.compile_blocks`). The next
        call compiles them (its time is logged); results equal the eager ones within float rounding."""
        self._compile_pending = compile_blocks(self.model.transformer, mode) > 0 or self._compile_pending
        return self

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Config | str | Path | None, device=None, dtype: torch.dtype | None = None,
                    overrides=(), offload: str = "none") -> Vis2IRPipeline:
        """The base model a config describes (pretrained or random backbone, untrained adapter)."""
        cfg = config if isinstance(config, Config) else load_config(config, overrides)
        device = default_device(device)
        dtype = dtype or resolve_dtype(cfg.model.dtype, device)
        model = build_model(cfg, build_device(cfg, offload, device), dtype)
        fuse(model, cfg)
        return cls(model, cfg, device).offload(offload)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device=None, dtype: torch.dtype | None = None, overrides=(),
                        config: Config | str | Path | None = None, offload: str = "none") -> Vis2IRPipeline:
        """A trained model from a checkpoint folder (or a run folder: its newest checkpoint).

        `overrides` and `config` may change sampling settings (a config supplies its `sample`
        section), never the model's shape: a difference in mode, codec or sizes is an error.
        """
        directory = find_checkpoint(path)
        trained = load_checkpoint_config(directory)
        cfg = load_checkpoint_config(directory, overrides)
        check_compatible(trained, cfg, directory, "the key=value overrides")
        if config is not None:
            expected = config if isinstance(config, Config) else load_config(config, overrides)
            check_compatible(trained, expected, directory, f"config {config}" if not isinstance(config, Config)
                             else "the config")
            cfg.sample = expected.sample
        device = default_device(device)
        dtype = dtype or resolve_dtype(cfg.model.dtype, device)
        model, _ = load_model(directory, build_device(cfg, offload, device), dtype, overrides)
        fuse(model, cfg)
        pipe = cls(model, cfg, device)
        pipe.trained_size = trained.data.size
        if trained.data.resize_policy == "bucket":
            pipe.trained_buckets = bucket_shapes(trained.data.size, trained.data.max_aspect)
        return pipe.offload(offload)

    def offload(self, how: str = "model") -> Vis2IRPipeline:
        """Keep weights on the CPU and move them to the device when used. `model` (accelerate's
        `cpu_offload_with_hook`) moves whole components (transformer, VAE) in for each call and out after it.
        `sequential` (diffusers' leaf-level group offloading: pinned CPU copies, each layer's weights copied in
        on a side stream while the layer before it computes, and dropped after) keeps about one layer on the
        device. On an H200 with the real-size model in bf16, 28 steps at 512×1024: `model` 19.4 s at a 23.6 GiB
        peak, `sequential` 14.4 s at 1.2 GiB (accelerate's layer-by-layer `cpu_offload`: 82 s); not offloaded
        2.6 s (docs/performance.md). A quantized base (`model.quantize`) is offloaded layer by layer with
        accelerate's `cpu_offload` (group offloading is not measured on its weights). The small adapter and
        prompt embeddings stay on the device."""
        if how not in OFFLOAD:
            raise Vis2IRError(f"--offload: {how!r} is not one of {', '.join(OFFLOAD)}")
        if how == "none":
            return self
        from accelerate import cpu_offload, cpu_offload_with_hook
        from diffusers.hooks import apply_group_offloading

        m = self.model
        parts = ([m.codec.vae] if isinstance(m.codec, VAECodec) else []) + [m.transformer]
        hook = None
        for part in parts:
            part.to("cpu")
            if how == "sequential" and self.cfg.model.quantize != "none":
                cpu_offload(part, execution_device=self.device)
            elif how == "sequential":
                apply_group_offloading(part, onload_device=self.device, offload_type="leaf_level",
                                       use_stream=self.device.type == "cuda")
            else:
                _, hook = cpu_offload_with_hook(part, self.device, prev_module_hook=hook)
                self._hooks.append(hook)
        if m.adapter is not None:
            m.adapter.to(self.device)
        m.prompt_embeds = m.prompt_embeds.to(self.device)
        m.pooled_prompt_embeds = m.pooled_prompt_embeds.to(self.device)
        if m.negative_prompt_embeds is not None:
            m.negative_prompt_embeds = m.negative_prompt_embeds.to(self.device)
        log.info("CPU offload: %s (execution device %s)", how, self.device)
        return self

    # -- generation ------------------------------------------------------------------------

    @property
    def needs_semantic(self) -> bool:
        return self.model.mode in NEEDS_SEMANTIC

    @property
    def reads_no_map(self) -> bool:
        """Whether a missing semantic map is allowed: the model was trained with `train.semantic_dropout` > 0,
        so an image without a map gets the all-unknown map (`semantic.modes.unknown_maps`) it was trained on."""
        return self.needs_semantic and self.cfg.train.semantic_dropout > 0

    def generation_size(self, size: int | str | None = None) -> int | None:
        """The longer side images are generated at (None: their own size), from `size` or `sample.size`."""
        size = self.cfg.sample.size if size is None else size
        if size == "auto":
            return self.trained_size
        if size == "native" or size == 0:
            return None
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise Vis2IRError(f"size: expected a number of pixels, 'auto' or 'native' (0), got {size!r}")
        return size

    def __call__(self, visible, semantic=None, steps: int | None = None, guidance: float | None = None,
                 seed: int | None = None, adapter_scale: float | None = None, batch_size: int = 1,
                 return_attention: bool = False, output_type: str = "pil", size: int | str | None = None,
                 progress: bool = False, callback=None) -> Vis2IROutput:
        """Infrared images for one visible image or a list (with matching semantic maps when the
        mode needs them). Unset steps, guidance, seed, adapter_scale and size come from the config's
        `sample` section. `callback(done, steps)` is called after each denoising step of each batch. Raises `NonFiniteOutput` when some outputs are NaN/inf (the others in it)."""
        visibles = visible if isinstance(visible, (list, tuple)) else [visible]
        semantics = None if semantic is None else semantic if isinstance(semantic, (list, tuple)) else [semantic]
        if semantics is not None and len(semantics) != len(visibles):
            raise Vis2IRError(f"got {len(visibles)} visible images but {len(semantics)} semantic maps")
        if self.needs_semantic and (semantics is None or any(m is None for m in semantics)):
            if not self.reads_no_map:
                raise Vis2IRError(f"model.semantic.mode={self.model.mode} needs a semantic map for every image: pass "
                                  "semantic=[maps] (or --semantic FILE|DIR); " + missing_maps_help(
                                      auto="--semantic auto",
                                      trained_mode=self.model.mode if self.trained_size is not None else None)
                                  + "; or train with train.semantic_dropout > 0, which makes maps optional")
            semantics = semantics or [None] * len(visibles)
        if return_attention and self.model.adapter is None:
            raise Vis2IRError(f"attention maps need model.semantic.mode=cross_attention (this model's mode is "
                              f"{self.model.mode}, which has no attention adapter): load a cross-attention model, e.g. "
                              "Vis2IRPipeline.from_checkpoint(\"demo_cross_attention\")")
        if output_type not in ("pil", "np", "pt"):
            raise Vis2IRError(f"output_type: expected 'pil', 'np' or 'pt', got {output_type!r}")
        if batch_size < 1:
            raise Vis2IRError(f"batch_size: expected an integer >= 1, got {batch_size}")
        s = self.cfg.sample
        if self.step_cache is None or self.step_cache.settings != s:  # counts accumulate while settings stay
            self.step_cache = StepCache.of(s)
        call = s.replaced(steps=steps, guidance=guidance, seed=seed, adapter_scale=adapter_scale)
        opts = dict(steps=call.steps, guidance=call.guidance, seed=call.seed, adapter_scale=call.adapter_scale,
                    return_attention=return_attention, progress=progress, callback=callback,
                    cache=self.step_cache)

        vis = [to_tensor(v, f"visible image {i}", self.normaliser) for i, v in enumerate(visibles)]
        sem = None if semantics is None or not self.needs_semantic else [
            unknown_maps(vis[i]) if m is None else to_tensor(m, f"semantic map {i}") for i, m in enumerate(semantics)]
        patch = patch_size(self.model.codec)
        longer = self.generation_size(size)
        if self.trained_buckets is not None and (self.cfg.sample.size if size is None else size) == "auto":
            sizes = [nearest_bucket(v.shape[2], v.shape[1], self.trained_buckets)[::-1] for v in vis]  # (h, w)
        else:
            sizes = [model_size(v.shape[1], v.shape[2], patch, longer) for v in vis]
        bad: list[int] = []
        images, attention = [None] * len(vis), [None] * len(vis)
        try:
            for idx in batches(sizes, batch_size):
                started = time.perf_counter()
                out = self._generate([vis[i] for i in idx], None if sem is None else [sem[i] for i in idx],
                                     sizes[idx[0]], self._timed(opts, sizes[idx[0]], len(idx), size))
                if self._compile_pending:  # the outputs are on the host now: the time is the GPU's too
                    self._compile_pending = False
                    log.info("sample.compile: first batch, compilation included: %.1f s", time.perf_counter() - started)
                for i, ir, finite, att in zip(idx, *out):
                    if finite:
                        images[i], attention[i] = to_output(ir, output_type), att
                    else:
                        bad.append(i)
        except torch.OutOfMemoryError:
            raise out_of_memory("generation", self.cfg, self.device) from None
        except Exception as err:
            if self._compile_pending and (failure := compile_failure(err, "sample.compile")) is not None:
                raise failure from None
            raise
        finally:
            for hook in self._hooks:
                hook.offload()
        if self.step_cache is not None:
            log.debug("%s", self.step_cache.summary())
        result = Vis2IROutput(images, attention if return_attention else None)
        if bad:
            raise NonFiniteOutput(bad, result)
        return result

    def _timed(self, opts: dict, size: tuple[int, int], images: int, asked) -> dict:
        """`opts` for a batch of `images` at `size` (h, w): for the first batch generated at more than `OVERSIZE`
        times the trained panel's pixels, with a callback that times its first two denoising steps (waiting for
        the device at those two only) and then logs `size_warning` (once per pipeline); else `opts` itself."""
        trained = self.trained_size
        if self._size_warned or trained is None or size[0] * size[1] <= OVERSIZE * trained ** 2:
            return opts
        then, marks = opts["callback"], [time.perf_counter()]
        work = transformer_work(self.model, *size) / transformer_work(self.model, trained, trained)

        def callback(done: int, steps: int) -> None:
            if not self._size_warned and done <= 2:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                marks.append(time.perf_counter())
                if done == min(2, steps):  # elapsed, and each step left at the pace of the last one
                    seconds = marks[-1] - marks[0] + (steps - done) * (marks[-1] - marks[-2])
                    self._size_warned = True
                    log.warning("%s", size_warning(self.cfg.sample.size if asked is None else asked, size, trained,
                                                   work, images, seconds, done, steps))
            if then is not None:
                then(done, steps)

        return {**opts, "callback": callback}

    def _generate(self, vis: list[torch.Tensor], sem: list[torch.Tensor] | None, size: tuple[int, int], opts: dict):
        """One batch of images that share a model size → (infrared on the host at input sizes, whether each is
        finite, attention maps). Resizing and the finiteness check run on the device (on the host they were a
        tenth of a compiled 28-step image's time)."""
        x = torch.stack([resize(v[None].to(self.device), size)[0] for v in vis])
        s = None if sem is None else torch.stack([resize(m[None].to(self.device), size, exact=True)[0] for m in sem])
        out = generate(self.model, x, s, **opts)
        ir, maps = out if opts["return_attention"] else (out, None)
        finite = torch.isfinite(ir.flatten(1)).all(1).tolist()
        ir = [resize(ir[i:i + 1].float(), tuple(v.shape[-2:]))[0].cpu() for i, v in enumerate(vis)]
        if maps is None:
            return ir, finite, [None] * len(vis)
        panels = num_panels(self.model.mode)
        rows, cols = token_grid(self.model.codec, size[0], size[1] * panels)
        stacked = torch.stack([a.float().cpu() for a in maps], dim=1)  # [B, layers, heads, N, M]
        return ir, finite, [AttentionMaps(stacked[i], rows, cols, tuple(v.shape[-2:]), panels)
                    for i, v in enumerate(vis)]


def transformer_work(model: Vis2IRModel, height: int, width: int) -> int:
    """The transformer's multiply-adds per block and denoising step for one image of `height × width` pixels,
    over the width d (heads × head dim): N·(12·d + 2·N) with N tokens (the image's panels and the prompt's):
    the dense layers do 12·d² per token (q, k, v and out 4·d², the MLP 8·d²), attention 2·d per pair of tokens
    (QKᵀ and the weighted sum of V). Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1."""
    cfg = model.transformer.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    panels = model.spec.sequence_panels(model.mode)
    rows, cols = token_grid(model.codec, height, width * panels)
    n = rows * cols + model.prompt_embeds.shape[1]
    return n * (12 * d + 2 * n)


def size_warning(asked, size: tuple[int, int], trained: int, work: float, images: int, seconds: float, timed: int,
                 steps: int) -> str:
    """The warning for generating at `size` (h, w pixels) with a model trained at `trained`² pixel panels:
    `asked` the size setting, `work` the transformer's work per step relative to the trained panel
    (`transformer_work`), `seconds` the estimated time of this batch of `images`, measured on its first
    `timed` of `steps` denoising steps."""
    pixels = size[0] * size[1] / trained ** 2
    return (f"size {asked}: generating at {size[1]}×{size[0]} pixels, {about(pixels)}× the pixels of the "
            f"{trained}×{trained} panel this model was trained at: about {about(work)}× the transformer's work per "
            f"step (it grows with the tokens, attention with their square), so this batch of {images} "
            f"image{'s' if images > 1 else ''} takes about {about(seconds)} s (timed on its first {timed} of {steps} "
            f"steps), and each batch of this size about as long; --size auto generates at the trained size "
            f"(sample.size=auto), or give a smaller --size")


def about(x: float) -> str:
    """`x` for a message: whole from 10 up, else to one decimal."""
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def fuse(model: Vis2IRModel, cfg: Config) -> None:
    """`sample.fuse`: the LoRA merged and the q/k/v projections fused (`speedup.fuse_for_sampling`), unless the
    base is quantized. For the models a pipeline builds itself, before it compiles or offloads them."""
    if not cfg.sample.fuse or cfg.model.quantize != "none":
        return
    done = fuse_for_sampling(model.transformer)
    if done:
        log.info("sample.fuse: %s", "; ".join(done))


def build_device(cfg: Config, offload: str, device: torch.device) -> torch.device:
    """Where the model is built: on the CPU when it is offloaded, unless it is quantized — a
    quantized transformer is quantized block by block on `device` (fast, and it fits by design)
    and only then offloaded."""
    return device if offload == "none" or cfg.model.quantize != "none" else torch.device("cpu")


def batches(sizes: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices in order, grouped into runs of equal size and cut into batches of at most `batch_size`."""
    out: list[list[int]] = []
    for i, s in enumerate(sizes):
        if out and len(out[-1]) < batch_size and sizes[out[-1][0]] == s:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def check_map(sem: Image.Image, vis: Image.Image, sem_label, vis_label, warn_void: bool = True) -> None:
    """A semantic map must be palette colours, with the aspect ratio of its photo (as in training); a
    `Vis2IRError` naming the map (`sem_label`) otherwise. Used by `generate` and the web app alike. `warn_void`:
    warn when the map is mostly unknown (`coverage.warn_mostly_void`; not for a model trained with
    `train.semantic_dropout`, which learnt to read such maps)."""
    if not same_aspect(sem.size, vis.size):
        raise Vis2IRError(f"{sem_label}: size mismatch: semantic map is {wxh(sem.size)}, not the aspect ratio "
                          f"of visible {vis_label} ({wxh(vis.size)})")
    problem = semantic_problem(None, sem.mode)
    rgb = None if problem else np.asarray(rgb_image(sem))[::2, ::2]
    problem = problem or semantic_problem(rgb)
    if problem:
        raise Vis2IRError(f"{sem_label}: {problem}")
    if warn_void:
        from vis2ir.data.coverage import warn_mostly_void

        warn_mostly_void(str(sem_label), rgb)
