"""The Python API, and the folder runner behind `vis2ir generate` and `vis2ir visualize`.

    pipe = Vis2IRPipeline.from_checkpoint("runs/demo", device="cuda")
    out = pipe(Image.open("scene.png"), semantic=Image.open("scene_semantic.png"), seed=0)
    out.images[0].save("scene_ir.png")

Images of any size go in: each is resized to a multiple of the codec's patch size for the model
(bicubic; semantic maps nearest, so their colours stay exact) and the infrared comes back at the
input's size. Every image is sampled with its own generator seeded with `seed`, so its result does
not depend on its batch, and with mode `none` (or adapter scale 0) it equals stock
`FluxFillPipeline` with `generator=torch.Generator("cpu").manual_seed(seed)`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from vis2ir.backbone import resolve_dtype
from vis2ir.checkpoint import CONFIG_FILE, find_checkpoint, load_checkpoint_config, load_model
from vis2ir.config import Config, first_difference, load_config
from vis2ir.data.images import IMAGE_SUFFIXES
from vis2ir.errors import Vis2IRError
from vis2ir.latents import VAECodec, patch_size, token_grid
from vis2ir.model import Vis2IRModel, build_model
from vis2ir.sample import generate
from vis2ir.semantic.modes import NEEDS_SEMANTIC, num_panels
from vis2ir.visualize import (AttentionMaps, check_output_format, infrared_image, save_attention_maps, side_by_side,
                              write_png)

log = logging.getLogger(__name__)

OFFLOAD = ("none", "model", "sequential")
# Settings that shape the model: a checkpoint only runs with the values it was trained with.
STRUCTURAL = ("model.backbone", "model.codec", "model.pixel_factor", "model.seed", "model.transformer.",
              "model.vae.", "model.text.", "model.lora.rank", "model.lora.target_modules", "model.semantic.mode",
              "model.semantic.num_layers", "model.semantic.num_heads", "model.semantic.position",
              "model.semantic.rope_", "model.semantic.inject_into", "model.semantic.fusion_alpha", "train.finetune")


# ----------------------------------------------------------------------------------------------
# Images in and out


def to_tensor(image: Any, what: str = "image") -> torch.Tensor:
    """A PIL image, array (`[H, W]`, `[H, W, 3|4]`; uint8, uint16 or float in [0, 1]) or tensor
    (`[3, H, W]`, `[H, W]`) → float `[3, H, W]` in [0, 1]."""
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L"):
            image = np.asarray(image, dtype=np.uint16)
        elif image.mode in ("I", "F"):
            image = np.asarray(image, dtype=np.float32) / (65535.0 if image.mode == "I" else 1.0)
        else:
            image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(image.dtype, 1.0)
        t = torch.from_numpy(image.astype(np.float32) / scale)
        t = t[None] if t.ndim == 2 else t[..., :3].permute(2, 0, 1) if t.ndim == 3 else t
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        t = t.float() / 255 if t.dtype == torch.uint8 else t.float()
        t = t[None] if t.ndim == 2 else t
    else:
        raise Vis2IRError(f"{what}: expected a PIL image, numpy array or tensor, got {type(image).__name__}")
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise Vis2IRError(f"{what}: expected [H, W], [H, W, 3] or [3, H, W], got shape {list(t.shape)}")
    return t.expand(3, -1, -1).clamp(0, 1)


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


def read_image(path: str | Path) -> Image.Image:
    """Open an image file fully (errors name the file)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise Vis2IRError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise Vis2IRError(f"{path}: cannot read the image ({str(err).strip() or type(err).__name__})") from None


# ----------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class Vis2IROutput:
    images: list                                  # PIL images, arrays or tensors, at the inputs' sizes
    attention: list[AttentionMaps] | None = None  # one per image, with `return_attention`


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device`, else `cuda:$LOCAL_RANK` when CUDA is available, else the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


class Vis2IRPipeline:
    """Visible (+ semantic) images → infrared images, with a `Vis2IRModel` and its config."""

    def __init__(self, model: Vis2IRModel, cfg: Config, device: str | torch.device | None = None):
        self.model = model.eval()
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else model.prompt_embeds.device
        self._hooks: list = []

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Config | str | Path | None, device=None, dtype: torch.dtype | None = None,
                    overrides=(), offload: str = "none") -> Vis2IRPipeline:
        """The base model a config describes (pretrained or random backbone, untrained adapter)."""
        cfg = config if isinstance(config, Config) else load_config(config, overrides)
        device = default_device(device)
        dtype = dtype or resolve_dtype(cfg.model.dtype, device)
        model = build_model(cfg, build_device(cfg, offload, device), dtype)
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
        return cls(model, cfg, device).offload(offload)

    def offload(self, how: str = "model") -> Vis2IRPipeline:
        """Keep weights on the CPU and move them to the device when used (diffusers' mechanisms):
        `model` moves whole components (transformer, VAE), `sequential` each layer in turn
        (slowest, least memory). The small adapter and prompt embeddings stay on the device."""
        if how not in OFFLOAD:
            raise Vis2IRError(f"--offload: {how!r} is not one of {', '.join(OFFLOAD)}")
        if how == "none":
            return self
        from accelerate import cpu_offload, cpu_offload_with_hook

        m = self.model
        parts = ([m.codec.vae] if isinstance(m.codec, VAECodec) else []) + [m.transformer]
        hook = None
        for part in parts:
            part.to("cpu")
            if how == "sequential":
                cpu_offload(part, execution_device=self.device)
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

    def __call__(self, visible, semantic=None, steps: int | None = None, guidance: float | None = None,
                 seed: int | None = None, adapter_scale: float | None = None, batch_size: int = 1,
                 return_attention: bool = False, output_type: str = "pil", size: int | None = None,
                 progress: bool = False) -> Vis2IROutput:
        """Infrared images for one visible image or a list (with matching semantic maps when the
        mode needs them). Unset steps, guidance, seed and adapter_scale come from the config's `sample` section."""
        visibles = visible if isinstance(visible, (list, tuple)) else [visible]
        semantics = None if semantic is None else semantic if isinstance(semantic, (list, tuple)) else [semantic]
        if semantics is not None and len(semantics) != len(visibles):
            raise Vis2IRError(f"got {len(visibles)} visible images but {len(semantics)} semantic maps")
        if semantics is None and self.needs_semantic:
            raise Vis2IRError(f"model.semantic.mode={self.model.mode} needs a semantic map for every image "
                              "(pass semantic=..., or --semantic FILE|DIR)")
        if return_attention and self.model.adapter is None:
            raise Vis2IRError(f"attention maps need model.semantic.mode=cross_attention (this model's mode is "
                              f"{self.model.mode})")
        if output_type not in ("pil", "np", "pt"):
            raise Vis2IRError(f"output_type: expected 'pil', 'np' or 'pt', got {output_type!r}")
        if batch_size < 1:
            raise Vis2IRError(f"batch_size: expected an integer >= 1, got {batch_size}")
        s = self.cfg.sample
        opts = dict(steps=steps or s.steps, guidance=s.guidance if guidance is None else guidance,
                    seed=s.seed if seed is None else seed,
                    adapter_scale=s.adapter_scale if adapter_scale is None else adapter_scale,
                    return_attention=return_attention, progress=progress)

        vis = [to_tensor(v, f"visible image {i}") for i, v in enumerate(visibles)]
        sem = None if semantics is None else [to_tensor(m, f"semantic map {i}") for i, m in enumerate(semantics)]
        patch = patch_size(self.model.codec)
        sizes = [model_size(v.shape[1], v.shape[2], patch, size) for v in vis]
        images, attention = [None] * len(vis), [None] * len(vis)
        try:
            for idx in batches(sizes, batch_size):
                out = self._generate([vis[i] for i in idx], None if sem is None else [sem[i] for i in idx],
                                     sizes[idx[0]], opts)
                for i, ir, att in zip(idx, *out):
                    images[i], attention[i] = to_output(ir, output_type), att
        finally:
            for hook in self._hooks:
                hook.offload()
        return Vis2IROutput(images, attention if return_attention else None)

    def _generate(self, vis: list[torch.Tensor], sem: list[torch.Tensor] | None, size: tuple[int, int], opts: dict):
        """One batch of images that share a model size → (infrared at input sizes, attention maps)."""
        x = torch.stack([resize(v[None], size)[0] for v in vis]).to(self.device)
        s = None if sem is None else torch.stack([resize(m[None], size, exact=True)[0] for m in sem]).to(self.device)
        out = generate(self.model, x, s, **opts)
        ir, maps = out if opts["return_attention"] else (out, None)
        ir = [resize(ir[i:i + 1].float().cpu(), tuple(v.shape[-2:]))[0] for i, v in enumerate(vis)]
        if maps is None:
            return ir, [None] * len(vis)
        panels = num_panels(self.model.mode)
        rows, cols = token_grid(self.model.codec, size[0], size[1] * panels)
        stacked = torch.stack([a.float().cpu() for a in maps], dim=1)  # [B, layers, heads, N, M]
        return ir, [AttentionMaps(stacked[i], rows, cols, tuple(v.shape[-2:]), panels)
                    for i, v in enumerate(vis)]


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


def check_compatible(trained: Config, cfg: Config, directory: Path, where: str) -> None:
    """Fail if `cfg` changes a setting that shapes the model (mode, codec, sizes) from the checkpoint's."""
    diff = first_difference(trained.flat(), cfg.flat(), STRUCTURAL)
    if diff:
        key, old, new = diff
        raise Vis2IRError(f"{where}: {key}={new!r} differs from the checkpoint's {old!r} "
                          f"({directory / CONFIG_FILE}); a checkpoint runs with the model settings it was trained with")


# ----------------------------------------------------------------------------------------------
# Folder in, folder out


@dataclass
class Item:
    """One input image, its semantic map and its output name."""

    name: str
    visible: Path
    semantic: Path | None = None
    problem: str | None = None  # why it cannot run (found while listing)


@dataclass
class Summary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def list_inputs(input_path: str | Path, semantic: str | Path | None = None) -> list[Item]:
    """The items of a run: one file or a folder's images, each matched to a semantic map by name
    (`semantic="auto"`: the map cached in `semantic_auto/` beside the inputs, made when missing)."""
    src = Path(input_path)
    if not src.exists():
        raise Vis2IRError(f"--input {src}: no such file or folder")
    paths = list_images(src) if src.is_dir() else [src]
    if not paths:
        raise Vis2IRError(f"--input {src}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    names: dict[str, Path] = {}
    for p in paths:
        if p.stem in names:
            raise Vis2IRError(f"--input: {names[p.stem].name} and {p.name} would both write {p.stem}.png")
        names[p.stem] = p
    items = [Item(p.stem, p) for p in paths]
    if semantic is None:
        return items
    sem = Path(semantic)
    if str(semantic) == "auto":  # maps cached beside the inputs; `run_generate` makes the missing ones
        from vis2ir.segment import AUTO_DIR, map_path

        cache = (src if src.is_dir() else src.parent) / AUTO_DIR
        for it in items:
            it.semantic = map_path(cache, it.name)
        return items
    if not sem.exists():
        raise Vis2IRError(f"--semantic {sem}: no such file or folder")
    if sem.is_file():
        if src.is_dir():
            raise Vis2IRError(f"--semantic {sem}: a single file goes with a single --input file; pass a folder "
                              "of maps named like the inputs")
        items[0].semantic = sem
        return items
    maps: dict[str, Path] = {}
    for p in list_images(sem):
        maps.setdefault(p.stem, p)
    for it in items:
        it.semantic = sem / it.visible.name if (sem / it.visible.name).is_file() else maps.get(it.name)
        if it.semantic is None:
            it.problem = f"no semantic map named {it.name}.* in {sem}"
    return items


def dist_env() -> tuple[int, int]:
    """`(rank, world_size)` from the RANK / WORLD_SIZE variables torchrun and accelerate set (else 0, 1)."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise Vis2IRError(f"RANK={os.environ.get('RANK')!r}, WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}: "
                          "expected integers") from None
    if not 0 <= rank < world:
        raise Vis2IRError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    return rank, world


def shard(items: list, rank: int, world: int) -> list:
    """This process's share of `items`: every `world`-th from `rank` (all shares together: each item once)."""
    return items[rank::world]


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
                 size: int | None = None, write_images: bool = True, segment_model: str | None = None) -> Summary:
    """Generate infrared for a file or a folder into `out` (`<name>.png`), under several processes
    each taking its share. Existing outputs are skipped unless `overwrite`; a bad input is reported
    and the run goes on; any failure ends in one error that lists them. With `semantic="auto"` the
    missing maps are made with the panoptic `segment_model` (default: `DEFAULT_SEGMENTER`)."""
    check_output_format(bit_depth, palette)
    if offload not in OFFLOAD:
        raise Vis2IRError(f"--offload: {offload!r} is not one of {', '.join(OFFLOAD)}")
    points = [parse_point(p) if isinstance(p, str) else p for p in points]
    out = Path(out)
    items = list_inputs(input, semantic)
    rank, world = dist_env()
    mine = shard(items, rank, world)
    cfg = _run_config(config, checkpoint, overrides)
    if cfg.model.semantic.mode in NEEDS_SEMANTIC and semantic is None:
        raise Vis2IRError(f"model.semantic.mode={cfg.model.semantic.mode} needs semantic maps: pass --semantic "
                          "FILE|DIR (maps named like the inputs), or use model.semantic.mode=none")
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
        _auto_semantic(todo, cfg.model.semantic.mode in NEEDS_SEMANTIC or compare, segment_model, device,
                       batch_size)
    if todo:
        pipe = (Vis2IRPipeline.from_checkpoint(checkpoint, device, overrides=overrides, config=config,
                                               offload=offload) if checkpoint
                else Vis2IRPipeline.from_config(cfg, device, offload=offload))
        opts = dict(seed=seed, steps=steps, guidance=guidance, adapter_scale=adapter_scale, size=size)
        with tqdm(total=len(todo), desc=f"generate {rank}/{world}" if world > 1 else "generate", unit="img") as bar:
            for group in _loaded_groups(todo, batch_size, summary, pipe.needs_semantic):
                _run_batch(pipe, group, out, summary, opts, attention, write_images, bit_depth, palette, compare,
                           points)
                bar.update(max(1, len(group)))
    log.info("Done: %d generated, %d skipped, %d failed -> %s", len(summary.done), len(summary.skipped),
             len(summary.failed), out)
    if summary.failed:
        listed = "; ".join(f"{k} ({v})" for k, v in list(summary.failed.items())[:5])
        more = f"; and {len(summary.failed) - 5} more" if len(summary.failed) > 5 else ""
        raise Vis2IRError(f"{len(summary.failed)} of {len(mine)} inputs failed: {listed}{more}")
    return summary


def _auto_semantic(items: list[Item], needed: bool, model: str | None, device, batch_size: int) -> None:
    """`--semantic auto`: make the items' missing maps (a failure marks its item); without a use for
    them (mode without semantics, no --compare) drop them instead."""
    if not needed:
        for it in items:
            it.semantic = None
        return
    from vis2ir.config import DEFAULT_SEGMENTER
    from vis2ir.segment import ensure_maps

    jobs = [(it.name, it.visible, it.semantic.parent) for it in items]  # names are file stems: no '/'
    failed = ensure_maps(jobs, model or DEFAULT_SEGMENTER, device, batch_size)
    for it in items:
        if it.name in failed:
            it.problem, it.semantic = f"no semantic map ({failed[it.name]})", None


def _run_config(config, checkpoint, overrides) -> Config:
    """The settings of the run (from the checkpoint when there is one), without building the model."""
    if checkpoint:
        return load_checkpoint_config(find_checkpoint(checkpoint), overrides)
    return load_config(config, overrides)


def _target(out: Path, it: Item, write_images: bool) -> Path:
    return out / f"{it.name}.png" if write_images else out / it.name / "point0.png"


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


def _run_batch(pipe: Vis2IRPipeline, group: list[_Loaded], out: Path, summary: Summary, opts: dict,
               attention: bool, write_images: bool, bit_depth: int, palette: str, compare: bool, points) -> None:
    if not group:
        return
    sem = [g.semantic for g in group] if pipe.needs_semantic else None
    try:
        result = pipe([g.visible for g in group], sem, batch_size=len(group), return_attention=attention,
                      output_type="pt", **opts)
    except Vis2IRError as err:
        for g in group:
            log.error("%s: %s", g.item.visible, err)
            summary.failed[g.item.name] = str(err)
        return
    for k, g in enumerate(group):
        try:
            _write_outputs(g, result.images[k], None if result.attention is None else result.attention[k], out,
                           write_images, bit_depth, palette, compare, points)
        except Vis2IRError as err:
            log.error("%s: %s", g.item.visible, err)
            summary.failed[g.item.name] = str(err)
            continue
        summary.done.append(g.item.name)


def _write_outputs(g: _Loaded, ir: torch.Tensor, att: AttentionMaps | None, out: Path, write_images: bool,
                   bit_depth: int, palette: str, compare: bool, points) -> None:
    """The files of one item: `<name>.png`, `compare/<name>.png`, attention heat-maps."""
    visible = np.asarray(g.visible.convert("RGB"))
    semantic = None if g.semantic is None else np.asarray(g.semantic.convert("RGB"))
    grey = ir.mean(0).numpy()
    if write_images:
        write_png(out / f"{g.item.name}.png", infrared_image(grey, bit_depth, palette))
    if compare:
        panels = [visible] + ([semantic] if semantic is not None else []) + [infrared_image(grey, 8, palette)]
        write_png(out / "compare" / f"{g.item.name}.png", side_by_side(panels))
    if att is not None:
        h, w = visible.shape[:2]
        save_attention_maps(out / "attention" / g.item.name if write_images else out / g.item.name, visible, att,
                            list(points) or [(w / 2, h / 2)], semantic)
