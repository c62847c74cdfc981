"""Panoptic maps for visible images: a transformers panoptic model, coloured with the shared palette.

    vis2ir segment --input photos/ --out photos/semantic [--model ID|PATH] [--batch-size 8]

The model (Mask2Former or OneFormer; a Hub id or a local `save_pretrained` folder) is run through
its own image processor and `post_process_panoptic_segmentation`. Its labels are matched to palette
classes by name (`palette.class_for_label` on `config.id2label`), so a COCO-panoptic model's classes
land on the palette's COCO colours; a label the palette lacks is drawn as void (black), with a warning.
Instances of a thing class are numbered in segment order and shaded apart; stuff keeps its base colour.

Per image `<out>/<stem>.png` (the colour map), `<out>/segments/<stem>.png` (16-bit segment ids, 0 =
none) and `<out>/segments/<stem>.json` (each segment's label, class, instance, score); once per folder
`legend.json` and `legend.png`. `ensure_maps` is the cache behind `generate --semantic auto` and
`data.semantic_source: auto` (colour maps only, in `semantic_auto/` beside the data).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vis2ir.config import DEFAULT_SEGMENTER
from vis2ir.palette import CLASS_NAMES, THING_IDS, VOID, class_for_label, colourise, legend_entries
from vis2ir.errors import Vis2IRError, first_line
from vis2ir.figures import palette_legend, save_figure
from vis2ir.files import check_writable, safe_join, write_text
from vis2ir.hub import cached_snapshot, check_hub, is_local, local_folder
from vis2ir.io.images import ImageError, read_image, write_png
from vis2ir.io.inputs import AUTO_DIR, Summary, list_inputs, map_path  # noqa: F401 (AUTO_DIR: the cache's name)
from vis2ir.io.runtime import default_device, dist_env, shard

log = logging.getLogger(__name__)

SEGMENTS_DIR = "segments"
NEEDED_FILES = ("config.json", "preprocessor_config.json")


LOCAL_LAYOUT = "transformers save_pretrained layout: config.json, preprocessor_config.json and the weights"


def _missing_model(model: str, reason: str, setting: str = "--model") -> Vis2IRError:
    """The one-line error for a segmenter that cannot be loaded; `setting`: the flag or setting that names it
    (`--model` of segment, `--segment-model` of generate, `data.segment_model`)."""
    flag = f"{setting} /path/to/model" if setting.startswith("--") else f"{setting}=/path/to/model"
    if is_local(model):  # a path: downloading it from the Hub is no answer
        return Vis2IRError(f"cannot load the panoptic segmenter {model!r} ({setting}): {reason}; give a folder in the "
                           f"{LOCAL_LAYOUT}, or a Hub id such as {DEFAULT_SEGMENTER}")
    return Vis2IRError(
        f"cannot load the panoptic segmenter {model!r} ({setting}): {reason}. Download it once while online "
        f"(`hf download {model}`, then it is read from the Hub cache), or pass a local folder with {flag} "
        f"({LOCAL_LAYOUT}); without a segmenter: draw maps from detection boxes (data.semantic_source=boxes, "
        "generate --boxes), or colour your own class ids with vis2ir.palette.colourise (docs/data.md, \"Maps "
        "without the Hub\")")


def load_panoptic_model(model: str, device: torch.device, setting: str = "--model"):
    """`(processor, model)` of a transformers panoptic segmenter from a local folder or the Hub.

    A Hub id is read from the local Hub cache when it is there (no network at all); otherwise one
    quick Hub check, then the download. Missing weights fail within seconds, naming `model` and the
    `setting` that chose it.
    """
    fail = lambda reason: _missing_model(model, reason, setting)  # noqa: E731
    if is_local(model):
        source = str(local_folder(model, NEEDED_FILES, fail, weights=(".",)))
    else:
        cached = cached_snapshot(model, NEEDED_FILES, weights=(".",), fail=fail)
        source = str(cached) if cached else model
        if not cached:
            check_hub(model, fail)
    # Only now, with weights to load: transformers' model code takes seconds to import.
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation, AutoProcessor

    try:
        net = AutoModelForUniversalSegmentation.from_pretrained(source)
        loader = AutoProcessor if net.config.model_type == "oneformer" else AutoImageProcessor
        processor = loader.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise fail(f"it cannot be read ({first_line(err)})") from None
    if not hasattr(processor, "post_process_panoptic_segmentation"):
        raise fail(f"{type(net).__name__} is not a panoptic segmenter (use Mask2Former or OneFormer)")
    return processor, net.to(device).eval()


@dataclass
class Panoptic:
    """One image's panoptic result: segment ids `[H, W]` (0: none) and one dict per segment."""

    segment_ids: np.ndarray
    segments: list[dict]

    def classes(self) -> tuple[np.ndarray, np.ndarray]:
        """Palette class ids and instance numbers per pixel (VOID and 0 where no segment)."""
        top = int(self.segment_ids.max(initial=0)) + 1
        cls, inst = np.full(top, VOID, np.int64), np.zeros(top, np.int64)
        for s in self.segments:
            cls[s["id"]], inst[s["id"]] = s["class_id"], s["instance"]
        return cls[self.segment_ids], inst[self.segment_ids]

    def colours(self) -> np.ndarray:
        """The colourised map, uint8 RGB `[H, W, 3]` (shared palette, instances shaded apart)."""
        return colourise(*self.classes())


class Segmenter:
    """A panoptic model, its processor and its label → palette mapping; call it on a list of PIL images."""

    def __init__(self, model: str = DEFAULT_SEGMENTER, device=None, threshold: float = 0.5, setting: str = "--model"):
        self.name, self.device, self.threshold = model, default_device(device), threshold
        self.processor, self.model = load_panoptic_model(model, self.device, setting)
        id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        self.label_class = {k: class_for_label(v) for k, v in id2label.items()}
        self.labels = id2label
        unknown = sorted(v for k, v in id2label.items() if self.label_class[k] == VOID)
        if unknown:
            log.warning("%s: %d labels have no palette class and are drawn as void: %s", model, len(unknown),
                        ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else ""))
        self.oneformer = self.model.config.model_type == "oneformer"

    @property
    def class_ids(self) -> list[int]:
        """The palette classes this model can produce."""
        return sorted({c for c in self.label_class.values() if c != VOID})

    @torch.no_grad()
    def __call__(self, images: list) -> list[Panoptic]:
        """Panoptic results for PIL images (one batch), at each image's own size."""
        images = [im.convert("RGB") for im in images]
        extra = {"task_inputs": ["panoptic"] * len(images)} if self.oneformer else {}
        inputs = self.processor(images=images, return_tensors="pt", **extra).to(self.device)
        inputs = {k: v.to(self.model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        outputs = self.model(**inputs)
        results = self.processor.post_process_panoptic_segmentation(
            outputs, threshold=self.threshold, label_ids_to_fuse=set(), target_sizes=[im.size[::-1] for im in images])
        # Not fused by transformers (its fusing can reuse segment ids); stuff shares one colour anyway.
        return [self._panoptic(r) for r in results]

    def _panoptic(self, result: dict) -> Panoptic:
        ids = result["segmentation"].cpu().numpy().astype(np.int32)
        ids[ids < 0] = 0
        segments, counts = [], {}
        for s in sorted(result["segments_info"], key=lambda s: s["id"]):
            label = int(s["label_id"])
            cls = self.label_class.get(label, VOID)
            instance = 0
            if cls in THING_IDS:
                instance = counts.get(cls, 0)
                counts[cls] = instance + 1
            segments.append({"id": int(s["id"]), "label_id": label, "label": self.labels.get(label, str(label)),
                             "class_id": cls, "class": CLASS_NAMES[cls] if cls != VOID else "void",
                             "instance": instance, "score": float(s["score"])})
        return Panoptic(ids, segments)


# ----------------------------------------------------------------------------------------------
# Files


def write_legend(folder: Path, segmenter: Segmenter) -> None:
    """`legend.json` (classes, colours, the model's label mapping) and `legend.png` in `folder`."""
    ids = segmenter.class_ids
    info = {"model": segmenter.name,
            "shading": "instance k of a thing class is its base colour + INSTANCE_SHADES[k % 27] "
                       "(vis2ir.palette); stuff and instance 0 keep the base colour; void is black",
            "classes": legend_entries(ids),
            "labels": {segmenter.labels[k]: (CLASS_NAMES[c] if c != VOID else "void")
                       for k, c in sorted(segmenter.label_class.items())}}
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "legend.json", json.dumps(info, indent=2))
    save_figure(folder / "legend.png", palette_legend(ids=ids, title=f"Classes of {segmenter.name}"))


def write_panoptic(out: Path, name: str, result: Panoptic, raw: bool = True) -> Path:
    """The files of one image; the colour map last, so its presence means the image is done."""
    if raw:
        if result.segment_ids.max(initial=0) > 65535:
            raise Vis2IRError(f"{name}: more than 65535 segments do not fit a 16-bit PNG")
        write_png(safe_join(out / SEGMENTS_DIR, name, ".png"), result.segment_ids.astype(np.uint16))
        write_text(safe_join(out / SEGMENTS_DIR, name, ".json"), json.dumps(result.segments, indent=1))
    return write_png(map_path(out, name), result.colours())


def segment_files(jobs: list[tuple[str, Path, Path]], segmenter: Segmenter | Callable[[], Segmenter],
                  batch_size: int = 4, raw: bool = False, desc: str = "segment") -> dict[str, str]:
    """Segment `(name, visible image, output root)` jobs whose colour map does not exist yet.

    `segmenter` may be a factory, called only when there is work. Maps are checked again before
    each batch, so processes sharing a folder skip what another has finished meanwhile. Returns
    the failures, name → reason (an unreadable image does not stop the run).
    """
    if batch_size < 1:
        raise Vis2IRError(f"--batch-size: expected an integer >= 1, got {batch_size}")
    todo = [j for j in jobs if not map_path(j[2], j[0]).exists()]
    failed: dict[str, str] = {}
    if not todo:
        return failed
    if not isinstance(segmenter, Segmenter):
        segmenter = segmenter()
    with tqdm(total=len(todo), desc=desc, unit="img") as bar:
        for start in range(0, len(todo), batch_size):
            batch, images = [], []
            for name, visible, root in todo[start:start + batch_size]:
                if map_path(root, name).exists():
                    continue
                try:
                    images.append(read_image(visible))
                    batch.append((name, root))
                except ImageError as err:
                    log.error("%s", err)
                    failed[name] = str(err)
            for (name, root), result in zip(batch, segmenter(images) if images else []):
                write_panoptic(root, name, result, raw)
            bar.update(len(todo[start:start + batch_size]))
    return failed


def ensure_maps(jobs: list[tuple[str, Path, Path]], model: str = DEFAULT_SEGMENTER, device=None,
                batch_size: int = 4, setting: str = "data.segment_model") -> dict[str, str]:
    """Create the missing colour maps of `(name, visible, root)` jobs (the `semantic auto` cache).

    Each process of a torchrun / accelerate launch starts with its own share, then helps with the
    rest; maps already on disk are reused without loading the model. `setting` names where `model`
    came from in its errors (`--segment-model`, `data.segment_model`). Returns failures, name → reason.
    """
    rank, world = dist_env()
    mine = shard(jobs, rank, world)
    rest = [j for i, j in enumerate(jobs) if i % world != rank]
    missing = sum(not map_path(root, name).exists() for name, _, root in jobs)
    root = jobs[0][2] if jobs else None
    made_by = _legend_model(root) if root else None
    if made_by not in (None, model):
        log.warning("%s: the cached maps were made by %s, not %s; delete the folder to remake them", root,
                    made_by, model)

    def make() -> Segmenter:  # whichever process makes maps writes the legend (atomic, same content)
        segmenter = Segmenter(model, device, setting=setting)
        log.info("Semantic maps: making the %d of %d missing with %s, cached in %s", missing, len(jobs), model, root)
        if _legend_model(root) is None:
            write_legend(root, segmenter)
        return segmenter

    return segment_files(mine + rest, make, batch_size, desc="semantic auto")


def _legend_model(folder: Path) -> str | None:
    """The model named in `folder/legend.json`, if there is one."""
    try:
        return json.loads((folder / "legend.json").read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None


def run_segment(input: str | Path, out: str | Path, model: str = DEFAULT_SEGMENTER, batch_size: int = 4,
                device=None, overwrite: bool = False, threshold: float = 0.5, recursive: bool = False):
    """`vis2ir segment`: colour maps, segment ids and a legend for a file or a folder of visible images
    (with `recursive`, of its sub-folders too: the maps mirror them, as a data layout's `semantic/` does).

    Under torchrun / accelerate each process takes its share. Returns the run's `Summary`.
    """
    out = check_writable(out, "--out")  # before the model loads
    items = list_inputs(input, recursive=recursive, exclude=(out,))
    if any(it.name == "legend" for it in items):
        raise Vis2IRError(f"--input {input}: an image named legend.* would collide with {out / 'legend.png'}; "
                          "rename it")
    rank, world = dist_env()
    mine = shard(items, rank, world)
    summary = Summary()
    jobs = []
    for it in mine:
        target = map_path(out, it.name)
        if target.exists() and not overwrite:
            summary.skipped.append(it.name)
        else:
            target.unlink(missing_ok=True)
            jobs.append((it.name, it.visible, out))
    log.info("Process %d/%d: %d inputs, %d to do, %d already done (use --overwrite to redo)", rank, world,
             len(mine), len(jobs), len(summary.skipped))
    segmenter = None
    if jobs or (rank == 0 and not (out / "legend.json").exists()):
        segmenter = Segmenter(model, device, threshold)
    if rank == 0 and segmenter is not None:
        write_legend(out, segmenter)
    desc = f"segment {rank}/{world}" if world > 1 else "segment"
    summary.failed = segment_files(jobs, segmenter, batch_size, raw=True, desc=desc) if jobs else {}
    summary.done = [j[0] for j in jobs if j[0] not in summary.failed]
    log.info("Done: %d segmented, %d skipped, %d failed -> %s", len(summary.done), len(summary.skipped),
             len(summary.failed), out)
    summary.raise_failures(len(mine))
    return summary
