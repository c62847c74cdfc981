"""The folder runner behind `vis2ir generate` and `vis2ir visualize`: a file or a folder of photos in,
infrared PNGs (and comparison pictures, attention maps) out, shared among processes, resumable.

Each input is matched to its semantic map (`--semantic`: a file, a folder of maps named like the inputs, or
`auto`) or drawn from its detection boxes (`--boxes`: a folder of YOLO/VOC/KAIST label files named like the
inputs, or one COCO file; `io.boxes`). An item whose `<name>.png` exists is skipped unless `overwrite`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from vis2ir.checkpoint import run_config
from vis2ir.errors import Vis2IRError
from vis2ir.files import DiskFull, check_writable, safe_join
from vis2ir.io.boxes import BoxLabels, UnmappedClass, open_for
from vis2ir.io.images import Normaliser, read_image, rgb_image, to_tensor, write_png
from vis2ir.io.inputs import Item, Summary, auto_cache, item_partners, list_inputs, missing_maps_help
from vis2ir.io.runtime import default_device, dist_env, shard
from vis2ir.pipeline import NOT_FINITE, OFFLOAD, NonFiniteOutput, Vis2IRPipeline, check_map
from vis2ir.quantize import OutOfMemory
from vis2ir.semantic.modes import NEEDS_SEMANTIC
from vis2ir.figures import save_figure
from vis2ir.visualize import AttentionMaps, check_output_format, compare_figure, infrared_image, save_attention_maps

log = logging.getLogger(__name__)


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
                 truth: str | Path | None = None, boxes: str | Path | None = None, box_classes=()) -> Summary:
    """Generate infrared for a file or a folder into `out` (`<name>.png`), under several processes
    each taking its share. Existing outputs are skipped unless `overwrite`; a bad input (unreadable,
    too large, a semantic map that is not palette colours or not the photo's aspect) or a non-finite
    output is reported and the run goes on; any failure ends in one error that lists them. `size`:
    see `Vis2IRPipeline` (default `sample.size`). With `semantic="auto"` the missing maps are made
    with the panoptic `segment_model` (default: `DEFAULT_SEGMENTER`). With `recursive` the images of
    sub-folders are generated too, their outputs in the same sub-folders of `out`. `truth`: a folder
    of true infrared images named like the inputs (with `recursive`, at the same relative paths, or by bare
    name in a flat folder), or a file for a single input, shown beside the prediction in `compare/`. `boxes`: the
    maps drawn from detection boxes (`io.boxes.BoxLabels`, categories mapped by `box_classes`, NAME=CLASS) instead
    of `semantic`. A model trained with `train.semantic_dropout` > 0 also runs without maps (the unknown map)."""
    if boxes is not None and semantic is not None:
        raise Vis2IRError("--boxes and --semantic: give one source of semantic maps, not both")
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
    cfg = run_config(config, checkpoint, overrides)
    cfg.sample.replaced(steps=steps, guidance=guidance, seed=seed, adapter_scale=adapter_scale)  # before any work
    if device is not None:
        default_device(device)
    mode = cfg.model.semantic.mode
    maps_help = missing_maps_help(input, f"{Path(input).with_suffix('')}_semantic", auto="--semantic auto",
                                  trained_mode=mode if checkpoint else None, recursive=recursive)
    optional = mode in NEEDS_SEMANTIC and cfg.train.semantic_dropout > 0  # the model reads the unknown map
    if mode in NEEDS_SEMANTIC and semantic is None and boxes is None and not optional:
        raise Vis2IRError(f"model.semantic.mode={mode} needs semantic maps: pass --semantic FILE|DIR (maps named "
                          f"like the inputs); {maps_help}; or use a model trained with train.semantic_dropout > 0, "
                          "which generates without maps")
    labels = None if boxes is None else open_for(boxes, [it.name for it in mine], box_classes, "--boxes",
                                                 "--box-classes", "input")
    if optional and labels is None and (without := sum(1 for it in mine if it.semantic is None)):
        log.info("%d of %d inputs have no semantic map: the model (trained with train.semantic_dropout=%g) reads "
                 "the unknown map for them", without, len(mine), cfg.train.semantic_dropout)
    attention = save_attention or not write_images
    if attention and cfg.model.semantic.mode != "cross_attention":
        raise Vis2IRError(f"attention maps need model.semantic.mode=cross_attention (the model's mode is "
                          f"{cfg.model.semantic.mode}, which has no attention adapter): use a cross-attention model, "
                          "e.g. the shipped one, --checkpoint demo_cross_attention, or fine-tune that one on your pairs "
                          "with train.init_from=demo_cross_attention model.semantic.mode=cross_attention "
                          "model.semantic.inject_into=condition (README: \"Attention maps\")")

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
            for group in _loaded_groups(todo, batch_size, summary, pipe.needs_semantic, optional, labels):
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


def _target(out: Path, it: Item, write_images: bool) -> Path:
    return safe_join(out, it.name, ".png") if write_images else safe_join(out, it.name) / "point0.png"


@dataclass
class _Loaded:
    item: Item
    visible: Image.Image
    semantic: Image.Image | None


def _loaded_groups(items: list[Item], batch_size: int, summary: Summary, needs_semantic: bool,
                   optional: bool = False, labels: BoxLabels | None = None):
    """Read the items in order, yielding lists of loaded items that can form one batch (same size). `optional`:
    an item without a map goes on (the model reads the unknown map); `labels`: maps drawn from boxes.

    An item that cannot be read is recorded as failed (and counted as one step of the progress bar).
    """
    group: list[_Loaded] = []
    for it in items:
        try:
            if it.problem and needs_semantic and not optional:
                raise Vis2IRError(f"{it.visible}: {it.problem}")
            visible = read_image(it.visible)
            if labels is not None:
                semantic = labels.draw_image(labels.find(it.name), *visible.size)
            else:
                semantic = read_image(it.semantic) if it.semantic else None
            loaded = _Loaded(it, visible, semantic)
            if it.semantic is not None and labels is None and needs_semantic:  # a map not read is not judged
                check_map(loaded.semantic, loaded.visible, it.semantic, it.visible, warn_void=not optional)
        except UnmappedClass:
            raise  # a category to map (--box-classes): every input would fail alike, so stop once
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
