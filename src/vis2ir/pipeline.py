"""The Python API, and the folder runner behind `vis2ir generate` and `vis2ir visualize`.

    pipe = Vis2IRPipeline.from_checkpoint("runs/demo", device="cuda")
    out = pipe(read_image("scene.png"), semantic=read_image("scene_semantic.png"), seed=0)  # vis2ir.io.images
    out.images[0].save("scene_ir.png")

Images of any size go in: each is resized for the model (bicubic; semantic maps nearest, so their
colours stay exact) and the infrared comes back at the input's size. The model's size (`size`, else
`sample.size`): `auto` is the panel size a checkpoint was trained at (`data.size` as the longer side; with
`data.resize_policy: bucket`, the input's aspect-ratio bucket, as training resized it)
and the input's own size for a model built from a config; `native` (or 0) the input's own size; a
number, the longer side. Either way each side is rounded to a multiple of the codec's patch size.
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
from tqdm.auto import tqdm

from vis2ir.backbone import resolve_dtype
from vis2ir.checkpoint import check_compatible, find_checkpoint, load_checkpoint_config, load_model
from vis2ir.config import Config, load_config
from vis2ir.data.buckets import bucket_shapes, nearest_bucket
from vis2ir.errors import Vis2IRError
from vis2ir.io.images import Normaliser, read_image, rgb_image, same_aspect, to_tensor, write_png, wxh
from vis2ir.files import DiskFull, check_writable, safe_join
from vis2ir.io.inputs import Item, Summary, auto_cache, item_partners, list_inputs, missing_maps_help
from vis2ir.io.runtime import default_device, dist_env, shard
from vis2ir.latents import VAECodec, patch_size, token_grid
from vis2ir.model import Vis2IRModel, build_model
from vis2ir.palette import semantic_problem
from vis2ir.quantize import OutOfMemory, out_of_memory
from vis2ir.sample import generate
from vis2ir.semantic.modes import NEEDS_SEMANTIC, num_panels
from vis2ir.speedup import StepCache, compile_blocks, compile_failure, fuse_for_sampling
from vis2ir.figures import save_figure
from vis2ir.visualize import AttentionMaps, check_output_format, compare_figure, infrared_image, save_attention_maps

log = logging.getLogger(__name__)

OFFLOAD = ("none", "model", "sequential")


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
        log.info("CPU offload: %s (execution device %s)", how, self.device)
        return self

    # -- generation ------------------------------------------------------------------------

    @property
    def needs_semantic(self) -> bool:
        return self.model.mode in NEEDS_SEMANTIC

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
        if semantics is None and self.needs_semantic:
            raise Vis2IRError(f"model.semantic.mode={self.model.mode} needs a semantic map for every image: pass "
                              "semantic=[maps] (or --semantic FILE|DIR); " + missing_maps_help(
                                  auto="--semantic auto",
                                  trained_mode=self.model.mode if self.trained_size is not None else None))
        if return_attention and self.model.adapter is None:
            raise Vis2IRError(f"attention maps need model.semantic.mode=cross_attention (this model's mode is "
                              f"{self.model.mode})")
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
        sem = None if semantics is None else [to_tensor(m, f"semantic map {i}") for i, m in enumerate(semantics)]
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
                                     sizes[idx[0]], opts)
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


# ----------------------------------------------------------------------------------------------
# Folder in, folder out


def parse_point(text: str) -> tuple[float, float]:
    """`"x,y"` (input pixels) → `(x, y)`."""
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise Vis2IRError(f"--point {text!r}: expected x,y in pixels, e.g. --point 120,80") from None
    return x, y


def run_generate(input: str | Path, out: str | Path, *, config=None, checkpoint=None, overrides=(),
                 semantic=None, seed: int | None = None, steps: int | None = None, guidance: float | None = None,
                 batch_size: int = 1, adapter_scale: float | None = None, overwrite: bool = False,
                 bit_depth: int = 8, palette: str = "white-hot", compare: bool = False,
                 save_attention: bool = False, points=(), offload: str = "none", device=None,
                 size: int | str | None = None, write_images: bool = True,
                 segment_model: str | None = None, recursive: bool = False,
                 truth: str | Path | None = None) -> Summary:
    """Generate infrared for a file or a folder into `out` (`<name>.png`), under several processes
    each taking its share. Existing outputs are skipped unless `overwrite`; a bad input (unreadable,
    too large, a semantic map that is not palette colours or not the photo's aspect) or a non-finite
    output is reported and the run goes on; any failure ends in one error that lists them. `size`:
    see `Vis2IRPipeline` (default `sample.size`). With `semantic="auto"` the missing maps are made
    with the panoptic `segment_model` (default: `DEFAULT_SEGMENTER`). With `recursive` the images of
    sub-folders are generated too, their outputs in the same sub-folders of `out`. `truth`: a folder
    of true infrared images named like the inputs (with `recursive`, at the same relative paths, or by bare
    name in a flat folder), or a file for a single input, shown beside the prediction in `compare/`."""
    check_output_format(bit_depth, palette)
    check_writable(out, "--out")  # before the model loads
    if isinstance(size, str) and size not in ("auto", "native"):
        raise Vis2IRError(f"--size: expected a number of pixels, 'auto' or 'native' (0), got {size!r}")
    if offload not in OFFLOAD:
        raise Vis2IRError(f"--offload: {offload!r} is not one of {', '.join(OFFLOAD)}")
    points = [parse_point(p) if isinstance(p, str) else p for p in points]
    out = Path(out)
    items = list_inputs(input, semantic, recursive=recursive, exclude=(out,))
    truths = _truths(truth, items, Path(input), recursive) if compare else {}
    rank, world = dist_env()
    mine = shard(items, rank, world)
    cfg = _run_config(config, checkpoint, overrides)
    cfg.sample.replaced(steps=steps, guidance=guidance, seed=seed, adapter_scale=adapter_scale)  # before any work
    if device is not None:
        default_device(device)
    mode = cfg.model.semantic.mode
    maps_help = missing_maps_help(input, f"{Path(input).with_suffix('')}_semantic", auto="--semantic auto",
                                  trained_mode=mode if checkpoint else None, recursive=recursive)
    if mode in NEEDS_SEMANTIC and semantic is None:
        raise Vis2IRError(f"model.semantic.mode={mode} needs semantic maps: pass --semantic FILE|DIR (maps named "
                          f"like the inputs); {maps_help}")
    attention = save_attention or not write_images
    if attention and cfg.model.semantic.mode != "cross_attention":
        raise Vis2IRError(f"attention maps need model.semantic.mode=cross_attention (the model's mode is "
                          f"{cfg.model.semantic.mode})")

    summary = Summary()
    todo = []
    for it in mine:
        if not overwrite and _target(out, it, write_images).exists():
            summary.skipped.append(it.name)
        else:
            todo.append(it)
    log.info("Process %d/%d: %d inputs, %d to do, %d already done (use --overwrite to redo)", rank, world,
             len(mine), len(todo), len(summary.skipped))
    if str(semantic) == "auto":
        _auto_semantic(todo, auto_cache(input), cfg.model.semantic.mode in NEEDS_SEMANTIC or compare,
                       segment_model, device, batch_size)
    if todo:
        pipe = (Vis2IRPipeline.from_checkpoint(checkpoint, device, overrides=overrides, config=config,
                                               offload=offload) if checkpoint
                else Vis2IRPipeline.from_config(cfg, device, offload=offload))
        opts = dict(seed=seed, steps=steps, guidance=guidance, adapter_scale=adapter_scale, size=size)
        with tqdm(total=len(todo), desc=f"generate {rank}/{world}" if world > 1 else "generate", unit="img") as bar:
            for group in _loaded_groups(todo, batch_size, summary, pipe.needs_semantic):
                _run_batch(pipe, group, out, summary, opts, attention, write_images, bit_depth, palette,
                           compare and truths, points)
                bar.update(max(1, len(group)))
    log.info("Done: %d generated, %d skipped, %d failed -> %s", len(summary.done), len(summary.skipped),
             len(summary.failed), out)
    lacking = any(it.problem and it.name in summary.failed for it in mine)
    summary.raise_failures(len(mine), f"for the missing semantic maps: {maps_help}" if lacking else None)
    return summary


def _truths(truth: str | Path | None, items: list[Item], src: Path, recursive: bool) -> dict[str, Path] | bool:
    """`--truth`: the true infrared image of each item that has one (`item_partners`: a file goes with a single
    input, a folder's files are named like the inputs); True (compare without truths) when None or none match.
    An input without a truth, or with several, is drawn without one (logged)."""
    if truth is None:
        return True
    partners = item_partners(items, src, truth, "--truth", "true infrared image", recursive)
    for why in partners.ambiguous.values():
        log.warning("--truth: %s; shown without a truth", why)
    if partners.missing:
        log.info("--truth: %d of %d inputs have no true infrared image in %s (e.g. %s.*); shown without one",
                 len(partners.missing), len(items), partners.folder, partners.missing[0])
    return partners.found or True


def _auto_semantic(items: list[Item], cache: Path, needed: bool, model: str | None, device, batch_size: int) -> None:
    """`--semantic auto`: make the items' missing maps (a failure marks its item); without a use for
    them (mode without semantics, no --compare) drop them instead."""
    if not needed:
        for it in items:
            it.semantic = None
        return
    from vis2ir.config import DEFAULT_SEGMENTER
    from vis2ir.segment import ensure_maps

    jobs = [(it.name, it.visible, cache) for it in items]  # a name may hold '/' (--recursive)
    failed = ensure_maps(jobs, model or DEFAULT_SEGMENTER, device, batch_size, setting="--segment-model")
    for it in items:
        if it.name in failed:
            it.problem, it.semantic = f"no semantic map ({failed[it.name]})", None


def _run_config(config, checkpoint, overrides) -> Config:
    """The settings of the run (from the checkpoint when there is one), without building the model."""
    if checkpoint:
        return load_checkpoint_config(find_checkpoint(checkpoint), overrides)
    return load_config(config, overrides)


def _target(out: Path, it: Item, write_images: bool) -> Path:
    return safe_join(out, it.name, ".png") if write_images else safe_join(out, it.name) / "point0.png"


@dataclass
class _Loaded:
    item: Item
    visible: Image.Image
    semantic: Image.Image | None


def _loaded_groups(items: list[Item], batch_size: int, summary: Summary, needs_semantic: bool):
    """Read the items in order, yielding lists of loaded items that can form one batch (same size).

    An item that cannot be read is recorded as failed (and counted as one step of the progress bar).
    """
    group: list[_Loaded] = []
    for it in items:
        try:
            if it.problem and needs_semantic:
                raise Vis2IRError(f"{it.visible}: {it.problem}")
            loaded = _Loaded(it, read_image(it.visible), read_image(it.semantic) if it.semantic else None)
            if loaded.semantic is not None and needs_semantic:  # a map the model does not read is not judged
                check_map(loaded.semantic, loaded.visible, it.semantic, it.visible)
        except Vis2IRError as err:
            log.error("%s", err)
            summary.failed[it.name] = str(err)
            yield []
            continue
        if group and (len(group) == batch_size or group[0].visible.size != loaded.visible.size):
            yield group
            group = []
        group.append(loaded)
    if group:
        yield group


def check_map(sem: Image.Image, vis: Image.Image, sem_label, vis_label) -> None:
    """A semantic map must be palette colours, with the aspect ratio of its photo (as in training); a
    `Vis2IRError` naming the map (`sem_label`) otherwise. Used by `generate` and the web app alike."""
    if not same_aspect(sem.size, vis.size):
        raise Vis2IRError(f"{sem_label}: size mismatch: semantic map is {wxh(sem.size)}, not the aspect ratio "
                          f"of visible {vis_label} ({wxh(vis.size)})")
    problem = semantic_problem(None, sem.mode)
    rgb = None if problem else np.asarray(rgb_image(sem))[::2, ::2]
    problem = problem or semantic_problem(rgb)
    if problem:
        raise Vis2IRError(f"{sem_label}: {problem}")
    from vis2ir.data.coverage import warn_mostly_void

    warn_mostly_void(str(sem_label), rgb)


def _run_batch(pipe: Vis2IRPipeline, group: list[_Loaded], out: Path, summary: Summary, opts: dict,
               attention: bool, write_images: bool, bit_depth: int, palette: str, compare: dict | bool,
               points) -> None:
    if not group:
        return
    sem = [g.semantic for g in group] if pipe.needs_semantic else None
    try:
        result = pipe([g.visible for g in group], sem, batch_size=len(group), return_attention=attention,
                      output_type="pt", **opts)
    except NonFiniteOutput as err:  # those items fail; the others are written
        result = err.output
        for k in err.bad:
            log.error("%s: %s", group[k].item.visible, NOT_FINITE)
            summary.failed[group[k].item.name] = NOT_FINITE
    except OutOfMemory:
        raise  # the next batch would fail alike: stop with the advice
    except Vis2IRError as err:
        for g in group:
            log.error("%s: %s", g.item.visible, err)
            summary.failed[g.item.name] = str(err)
        return
    for k, g in enumerate(group):
        if result.images[k] is None:
            continue
        try:
            _write_outputs(g, result.images[k], None if result.attention is None else result.attention[k], out,
                           write_images, bit_depth, palette, compare, points, pipe.normaliser)
        except DiskFull:
            raise  # every later write would fail alike: stop, one line
        except Vis2IRError as err:
            log.error("%s: %s", g.item.visible, err)
            summary.failed[g.item.name] = str(err)
            continue
        summary.done.append(g.item.name)


def _write_outputs(g: _Loaded, ir: torch.Tensor, att: AttentionMaps | None, out: Path, write_images: bool,
                   bit_depth: int, palette: str, compare: dict | bool, points, normaliser: Normaliser) -> None:
    """The files of one item: `compare/<name>.png` (`compare`: true, or the truths by name, `_truths`), attention
    heat-maps, and last `<name>.png`, whose presence marks the item done (a re-run skips it): an item whose
    writing failed part-way is done again."""
    shown = to_tensor(g.visible, str(g.item.visible), normaliser)  # 16-bit photos as the model saw them
    visible = (shown * 255).round().byte().permute(1, 2, 0).numpy()
    semantic = None if g.semantic is None else np.asarray(rgb_image(g.semantic))
    grey = ir.mean(0).numpy()
    if compare:
        panels = {"visible": visible} | ({"semantic": semantic} if semantic is not None else {})
        panels[f"generated infrared ({palette})"] = infrared_image(grey, 8, palette)
        known = compare.get(g.item.name) if isinstance(compare, dict) else None
        if known is not None:  # the truth as the model's output is scored: one channel, at the output's size
            true = to_tensor(read_image(known), str(known), normaliser).mean(0)
            if tuple(true.shape) != grey.shape:
                true = F.interpolate(true[None, None], size=grey.shape, mode="bilinear", align_corners=False)[0, 0]
            panels[f"truth ({palette})"] = infrared_image(true.numpy(), 8, palette)
        save_figure(safe_join(out / "compare", g.item.name, ".png"),
                    compare_figure(panels, f"{g.item.name}: visible → infrared"))
    if att is not None:
        h, w = visible.shape[:2]
        save_attention_maps(safe_join(out / "attention" if write_images else out, g.item.name), visible, att,
                            list(points) or [(w / 2, h / 2)], semantic)
    if write_images:
        write_png(safe_join(out, g.item.name, ".png"), infrared_image(grey, bit_depth, palette), full_range=True)
