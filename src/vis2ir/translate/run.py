"""The runner of `vis2ir translate`: every photo of a data set to infrared, the data set's layout kept.

    vis2ir translate coco/ --out coco_ir/ --checkpoint runs/mine            # one process
    torchrun --nproc-per-node 4 -m vis2ir.cli translate coco/ --out coco_ir/ --checkpoint runs/mine

The photos of the source (`layouts.detect`) are shared among the processes (RANK/WORLD_SIZE: photo i goes to
rank i mod WORLD_SIZE). In each, loader workers read the photos and draw their semantic maps, the pipeline
denoises them in batches, and a writer thread encodes each image, renames it into place and appends its line to
the rank's manifest (`record`), so the device does not wait for decoding or encoding. A photo that cannot be
read or gives no finite output is recorded as failed, and the run goes on. A run started again skips what the
manifests record as done, so a killed run continues where it stopped; every photo is sampled with the same
seed, so its image does not depend on its batch, its rank or the restart. When every photo is accounted for,
one process (the first to claim it) carries the annotations over (`Layout.carry_over`) and writes the card.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vis2ir.checkpoint import find_checkpoint, run_config
from vis2ir.checkpoint_files import checkpoint_identity
from vis2ir.config import Config
from vis2ir.errors import Vis2IRError
from vis2ir.files import atomic_write, check_writable, safe_join
from vis2ir.io.boxes import BoxLabels, UnmappedClass, open_for
from vis2ir.io.images import read_image, write_png
from vis2ir.io.inputs import map_path, missing_maps_help
from vis2ir.io.runtime import default_device, dist_env, shard
from vis2ir.pipeline import NOT_FINITE, NonFiniteOutput, Vis2IRPipeline, check_map
from vis2ir.quantize import OutOfMemory
from vis2ir.semantic.modes import NEEDS_SEMANTIC
from vis2ir.translate.layouts import FORMATS, Layout, Photo, detect, output_rel
from vis2ir.translate.record import (STATE, Manifest, check_settings, claim_finalize, finished_counts, names_digest,
                                     read_manifests, release_finalize, settings_digest, state_dir, sweep_temporaries,
                                     write_finished)
from vis2ir.visualize import check_output_format, infrared_image

log = logging.getLogger(__name__)

SIXTEEN_BIT = (".png", ".tif", ".tiff")  # formats that hold 16-bit grey
JPEG_QUALITY = 95


@dataclass
class TranslateSummary:
    """What one process did: photos translated now, skipped (done before), failed (name → why); images/s over its
    loop; the share of that loop the device waited for the loader or the writer; the card, when it finalized."""

    photos: int = 0
    done: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    images_per_s: float = 0.0
    wait_share: float = 0.0
    seconds: float = 0.0
    card: Path | None = None


@dataclass
class Maps:
    """Where each photo's semantic map comes from: `boxes` (drawn from `labels`: the layout's sources, a photo's
    by its `Photo.labels`, or one `--boxes` source for every photo, `single`), `folder` (maps named like the photos
    under `root`), `auto` (the segmenter's, made into `root` before the loop), or `none`."""

    kind: str
    labels: list[BoxLabels] = field(default_factory=list)
    root: Path | None = None
    single: bool = False

    def describe(self) -> str:
        """One line for the log and the settings (absolute paths: the same whichever folder a run starts in)."""
        if self.kind == "boxes":
            return "boxes: " + ", ".join(f"{lab.layout} {Path(lab.path).resolve()}" for lab in self.labels)
        return f"folder {Path(self.root).resolve()}" if self.kind == "folder" else self.kind

    def draw(self, photo: Photo, root: Path, visible: Image.Image) -> Image.Image | None:
        """The map of `photo` at `visible`'s size (None: no map). Raises `Vis2IRError` (a bad map or box file)."""
        if self.kind == "boxes":
            if self.single:
                labels, key = self.labels[0], _stem(photo.rel)
            else:  # a photo no annotation file lists: background only, as a YOLO set without its label file
                labels, key = self.labels[max(photo.labels, 0)], photo.key if photo.labels >= 0 else None
            return labels.draw_image(None if key is None else labels.find(key), *visible.size)
        if self.kind in ("folder", "auto"):
            path = map_path(self.root, _stem(photo.rel))
            semantic = read_image(path)
            check_map(semantic, visible, path, root / photo.rel)
            return semantic
        return None


def _stem(rel: str) -> str:
    """`train/a.jpg` → `train/a`: the name maps and boxes are looked up by."""
    return PurePosixPath(rel).with_suffix("").as_posix()


@dataclass
class _Loaded:
    index: int
    visible: Image.Image | None = None
    semantic: Image.Image | None = None
    error: str | None = None
    fatal: bool = False


class PhotoSet(Dataset):
    """The photos of one process, read (and their maps drawn) in loader workers."""

    def __init__(self, root: Path, photos: list[Photo], maps: Maps):
        self.root, self.photos, self.maps = root, photos, maps

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, i: int) -> _Loaded:
        photo = self.photos[i]
        try:
            visible = read_image(self.root / photo.rel)
            return _Loaded(i, visible, self.maps.draw(photo, self.root, visible))
        except UnmappedClass as err:  # a setting to give, the same for every photo: stop once
            return _Loaded(i, error=str(err), fatal=True)
        except Vis2IRError as err:
            return _Loaded(i, error=str(err))


class Writer(threading.Thread):
    """Runs the writes (image files, manifest lines) in order beside the denoising; `put` blocks when `depth`
    writes wait, and returns the seconds it waited. The first error stops the writes and is raised by `check`."""

    def __init__(self, depth: int):
        super().__init__(daemon=True, name="vis2ir-translate-writer")
        self.jobs: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    job()
                except BaseException as err:  # raised in the main thread by `check`
                    self.error = err

    def put(self, job) -> float:
        started = time.perf_counter()
        self.jobs.put(job)
        return time.perf_counter() - started

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> float:
        started = time.perf_counter()
        self.jobs.put(None)
        self.join()
        self.check()
        return time.perf_counter() - started


def write_image(path: Path, grey: np.ndarray, bit_depth: int, palette: str) -> Path:
    """Save float infrared `[H, W]` in [0, 1] in the format of `path`'s suffix, atomically: PNG (16-bit PNGs
    marked full-range, as `generate` writes them), JPEG at quality `JPEG_QUALITY`, else Pillow's format for it."""
    array = infrared_image(grey, bit_depth, palette)
    suffix = path.suffix.lower()
    if suffix == ".png":
        return write_png(path, array, full_range=True)
    fmt = Image.registered_extensions().get(suffix)
    options = {"quality": JPEG_QUALITY} if fmt == "JPEG" else {}
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format=fmt, **options))


def run_translate(source: str | Path, out: str | Path, *, config=None, checkpoint=None, overrides=(),
                  layout: str = "auto", semantic: str | None = None, boxes: str | Path | None = None,
                  box_classes=(), segment_model: str | None = None, image_format: str = "source",
                  bit_depth: int = 8, palette: str = "white-hot", seed: int | None = None, steps: int | None = None,
                  guidance: float | None = None, size: int | str | None = None, batch_size: int = 1,
                  workers: int = 2, device=None, finalize: bool = False,
                  pipe: Vis2IRPipeline | None = None) -> TranslateSummary:
    """Translate the photos of `source` (a COCO, YOLO, VOC or plain layout: `layout`) into `out`, this process's
    share (RANK/WORLD_SIZE), and finalize when every photo is accounted for (`finalize`: only that, and refuse if
    some are not). `semantic`: None (the layout's boxes where the model needs maps), `none`, `auto` (the panoptic
    segmenter, maps cached under out/.vis2ir/), or a folder of maps named like the photos; `boxes`: one box source
    for every photo (as `generate --boxes`). `image_format`: `source` or `png`. `pipe`: a pipeline already built
    (benchmarks, tests). Returns this process's `TranslateSummary`; raises `Vis2IRError` at the end, listing them,
    when photos failed (the rest is written and, once all are done, finalized without them)."""
    source, out = Path(source), Path(out)
    check_output_format(bit_depth, palette)
    if image_format not in FORMATS:
        raise Vis2IRError(f"--format: expected one of {', '.join(FORMATS)}, got {image_format!r}")
    if batch_size < 1 or workers < 0:
        raise Vis2IRError(f"--batch-size must be >= 1 and --workers >= 0 (got {batch_size}, {workers})")
    if pipe is None and config is None and checkpoint is None:
        raise Vis2IRError("vis2ir translate: pass --checkpoint DIR (a trained model) or --config FILE")
    if not source.is_dir():
        raise Vis2IRError(f"SOURCE {source}: not a folder; expected a data set folder (COCO, YOLO, VOC or images)")
    if out.resolve() == source.resolve() or out.resolve().is_relative_to(source.resolve()):
        raise Vis2IRError(f"--out {out}: inside the source {source}; write the translation to a folder outside it")
    if out.is_dir() and not (out / STATE).is_dir() and any(out.iterdir()):
        raise Vis2IRError(f"--out {out}: a folder that holds other files and no translation; write to a new or empty "
                          "folder (its files would be overwritten by the data set's)")
    check_writable(out, "--out")
    lay = detect(source, layout)
    photos = lay.photos()
    renamed = (lambda rel: output_rel(rel, image_format))
    _check_format(photos, image_format, bit_depth)
    cfg = pipe.cfg if pipe is not None else run_config(config, checkpoint, overrides)
    cfg.sample.replaced(steps=steps, guidance=guidance, seed=seed)  # checks them before any work
    maps = _maps(cfg, lay, photos, semantic, boxes, box_classes, source)
    settings = _settings(cfg, checkpoint, lay, maps, box_classes, size, image_format, bit_depth, palette, steps,
                         guidance, seed)
    model = f"`{Path(checkpoint).resolve()}` ({settings['model']})" if checkpoint else settings["model"]
    check_settings(out, settings)  # recorded once the model has loaded
    log.info("%s -> %s: %s; semantic maps: %s", source, out, lay.describe(), maps.describe())
    if finalize:
        return TranslateSummary(len(photos), card=_finalize(lay, out, photos, renamed, settings, model, force=True))

    rank, world = dist_env()
    if out.is_dir() and (swept := sweep_temporaries(out)):
        log.info("Removed %d temporary files a killed run left in %s", swept, out)
    done, _ = read_manifests(out)
    mine = shard(photos, rank, world)
    todo = [p for p in mine if p.rel not in done]
    del done
    summary = TranslateSummary(len(mine), skipped=len(mine) - len(todo))
    log.info("Process %d/%d: %d photos, %d to do, %d done before", rank, world, len(mine), len(todo), summary.skipped)
    if todo:
        if semantic == "auto":
            _auto_maps(todo, source, out, maps, segment_model, device, batch_size)
        if device is not None:
            default_device(device)
        if pipe is None:
            pipe = (Vis2IRPipeline.from_checkpoint(checkpoint, device, overrides=overrides, config=config) if checkpoint
                    else Vis2IRPipeline.from_config(cfg, device))
        check_settings(out, settings, record=True)
        _translate(pipe, source, out, todo, maps, summary, renamed, rank, world, settings,
                   dict(seed=seed, steps=steps, guidance=guidance, size=size), batch_size, workers, bit_depth, palette)
    summary.card = _finalize(lay, out, photos, renamed, settings, model, force=False)
    if summary.failed:
        listed = "; ".join(f"{k} ({v})" for k, v in list(summary.failed.items())[:5])
        more = f"; and {len(summary.failed) - 5} more" if len(summary.failed) > 5 else ""
        message = (f"{len(summary.failed)} of {len(mine)} photos failed: {listed}{more}; the others are written; run "
                   "the same command again to retry the failed ones")
        if world > 1:  # a rank that exits non-zero makes torchrun stop the others: say it, and go on
            log.error("Process %d/%d: %s", rank, world, message)
        else:
            raise Vis2IRError(message)
    return summary


def _translate(pipe: Vis2IRPipeline, source: Path, out: Path, todo: list[Photo], maps: Maps, summary: TranslateSummary,
               renamed, rank: int, world: int, settings: dict, opts: dict, batch_size: int, workers: int,
               bit_depth: int, palette: str) -> None:
    """The loop of one process: loader → pipeline → writer, timed (`summary`)."""
    loader = DataLoader(PhotoSet(source, todo, maps), batch_size=batch_size, num_workers=workers,
                        collate_fn=list, prefetch_factor=4 if workers else None)
    manifest = Manifest(out, rank, world)
    writer = Writer(depth=4 * batch_size)
    waited, started = 0.0, time.perf_counter()
    seed = pipe.cfg.sample.seed if opts["seed"] is None else opts["seed"]
    digest = settings_digest(settings)
    try:
        with tqdm(total=len(todo), desc=f"translate {rank}/{world}" if world > 1 else "translate",
                  unit="img") as bar:
            batches = iter(loader)
            while True:
                t = time.perf_counter()
                batch = next(batches, None)
                waited += time.perf_counter() - t
                if batch is None:
                    break
                good = []
                for b in batch:
                    if b.fatal:
                        raise Vis2IRError(b.error)
                    if b.error is None:
                        good.append(b)
                    else:
                        waited += _fail(writer, manifest, summary, todo[b.index].rel, b.error)
                t = time.perf_counter()
                images = _denoise(pipe, good, opts, todo, summary, writer, manifest) if good else []
                seconds = (time.perf_counter() - t) / max(1, len(good))
                for b, ir in zip(good, images):
                    if ir is None:
                        waited += _fail(writer, manifest, summary, todo[b.index].rel, NOT_FINITE)
                        continue
                    rel = todo[b.index].rel
                    entry = {"input": rel, "output": renamed(rel), "seed": seed, "model": settings["model"],
                             "settings": digest, "seconds": round(seconds, 3)}
                    waited += writer.put(_write_job(safe_join(out, entry["output"]), ir, bit_depth, palette, manifest, entry))
                    summary.done += 1
                writer.check()
                bar.update(len(batch))
        waited += writer.close()
    finally:
        if writer.is_alive():
            writer.jobs.put(None)
            writer.join()
        manifest.close()
    summary.seconds = time.perf_counter() - started
    summary.images_per_s = summary.done / summary.seconds if summary.seconds else 0.0
    summary.wait_share = waited / summary.seconds if summary.seconds else 0.0
    log.info("Process %d/%d: %d translated, %d failed in %.1f s (%.3f images/s; waited for the loader or writer "
             "%.1f %% of the time)", rank, world, summary.done, len(summary.failed), summary.seconds,
             summary.images_per_s, 100 * summary.wait_share)


def _denoise(pipe, good: list[_Loaded], opts: dict, todo, summary, writer, manifest) -> list:
    """The batch's infrared `[H, W]` float arrays (None where not finite); a batch the pipeline refuses fails whole."""
    sem = [b.semantic for b in good] if pipe.needs_semantic else None
    try:
        result = pipe([b.visible for b in good], sem, batch_size=len(good), output_type="pt", **opts)
    except NonFiniteOutput as err:
        result = err.output
    except OutOfMemory:
        raise  # the next batch would fail alike: stop with the advice
    except Vis2IRError as err:
        for b in good:
            _fail(writer, manifest, summary, todo[b.index].rel, str(err))
        return []
    return [None if ir is None else ir.float().mean(0).numpy() for ir in result.images]


def _write_job(path: Path, grey: np.ndarray, bit_depth: int, palette: str, manifest: Manifest, entry: dict):
    def job() -> None:
        write_image(path, grey, bit_depth, palette)  # renamed into place first: then the line says it is done
        manifest.append(entry)
    return job


def _fail(writer: Writer, manifest: Manifest, summary: TranslateSummary, rel: str, why: str) -> float:
    log.error("%s: %s", rel, why)
    summary.failed[rel] = why
    return writer.put(lambda: manifest.append({"input": rel, "error": why}))


def _finalize(lay: Layout, out: Path, photos: list[Photo], renamed, settings: dict, model: str,
              force: bool) -> Path | None:
    """Carry the annotations over and write the card, once every photo is done or failed (`force`: `--finalize`,
    which refuses while some are not, and takes over a finalize that was killed)."""
    done, failed = read_manifests(out)
    missing = [p.rel for p in photos if p.rel not in done and p.rel not in failed]
    if missing:
        if force:
            raise Vis2IRError(f"--finalize: {len(missing)} of {len(photos)} photos are not translated yet (e.g. "
                              f"{missing[0]}): run translate (every rank) to finish them first")
        log.info("%d of %d photos are not done yet (other processes, or a later run): the annotations and the card "
                 "are written when all are", len(missing), len(photos))
        return None
    if not claim_finalize(out, force):
        log.warning("Another process is finalizing %s (%s); if none is (one was killed doing it on another machine), "
                    "run this command with --finalize", out, state_dir(out) / "finalize.lock")
        return None
    try:
        started = time.perf_counter()
        left_out = {p.rel: failed[p.rel] for p in photos if p.rel not in done}
        counts = {"photos": len(photos), "done": len(photos) - len(left_out), "failed": len(left_out),
                  "names": names_digest(done)}
        if not force and (before := finished_counts(out)) and all(before.get(k) == v for k, v in counts.items()):
            log.info("%s was finalized with these photos already", out)  # by another process, or an earlier run
            return None
        written = lay.carry_over(out, renamed, set(left_out))
        counts["annotation_files"] = len(written)
        date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        card = write_finished(out, lay.root, lay.kind, settings, counts, left_out, time.perf_counter() - started, date,
                              model)
    finally:
        release_finalize(out)
    log.info("Finalized %s: %d images, %d annotation files carried over, %d left out; card: %s", out, counts["done"],
             len(written), len(left_out), card)
    return card


def _check_format(photos: list[Photo], image_format: str, bit_depth: int) -> None:
    """16-bit images need a format that holds them; every photo's suffix must be one Pillow writes; no two photos
    may give one output (`a.jpg` and `a.png` with --format png)."""
    seen: dict[str, str] = {}
    writable = Image.registered_extensions()
    for p in photos:
        rel = output_rel(p.rel, image_format)
        if (other := seen.setdefault(rel, p.rel)) != p.rel:
            raise Vis2IRError(f"--format {image_format}: {other} and {p.rel} would both be written as {rel}; rename "
                              "one, or keep each photo's format (--format source)")
        suffix = Path(rel).suffix.lower()
        if bit_depth == 16 and suffix not in SIXTEEN_BIT:
            raise Vis2IRError(f"--bit-depth 16: {p.rel} would be written as {suffix}, which holds 8 bits; pass "
                              "--format png")
        if suffix not in writable:
            raise Vis2IRError(f"{p.rel}: Pillow writes no {suffix} files; pass --format png")


def _maps(cfg: Config, lay: Layout, photos: list[Photo], semantic, boxes, box_classes, source: Path) -> Maps:
    """The semantic source of the run, checked before the model loads (module docstring of `run_translate`)."""
    mode = cfg.model.semantic.mode
    needs = mode in NEEDS_SEMANTIC
    optional = needs and cfg.train.semantic_dropout > 0
    if boxes is not None and semantic is not None:
        raise Vis2IRError("--boxes and --semantic: give one source of semantic maps, not both")
    if not needs:
        if semantic not in (None, "none") or boxes is not None:
            log.warning("model.semantic.mode=%s reads no semantic maps: --semantic/--boxes ignored", mode)
        return Maps("none")
    if boxes is not None:
        labels = open_for(boxes, [_stem(p.rel) for p in photos], box_classes, "--boxes", "--box-classes", "photo")
        labels.check_classes()
        return Maps("boxes", [labels], single=True)
    if semantic == "none":
        if not optional:
            raise Vis2IRError(f"--semantic none: model.semantic.mode={mode} needs semantic maps, and this model was "
                              "not trained with train.semantic_dropout > 0 (which makes them optional)")
        return Maps("none")
    if semantic == "auto":
        return Maps("auto")  # made into out/.vis2ir/semantic_auto by _auto_maps
    if semantic is not None:
        root = Path(semantic)
        if not root.is_dir():
            raise Vis2IRError(f"--semantic {root}: not a folder; expected maps named like the photos, 'auto' or 'none'")
        return Maps("folder", root=root)
    if lay.labels:
        labels = []
        for path in lay.labels:
            try:
                labels.append(BoxLabels.open(path, box_classes, "--box-classes"))
                labels[-1].check_classes()
            except UnmappedClass:
                raise
            except Vis2IRError as err:
                raise Vis2IRError(f"the source's annotations: {err}") from None
        return Maps("boxes", labels)
    if optional:
        log.info("%s has no box annotations: the model (trained with train.semantic_dropout=%g) reads the unknown map",
                 source, cfg.train.semantic_dropout)
        return Maps("none")
    raise Vis2IRError(f"model.semantic.mode={mode} needs semantic maps and {source} ({lay.kind}) has no box "
                      f"annotations: pass --boxes PATH, --semantic DIR|auto; "
                      + missing_maps_help(source, auto="--semantic auto"))


def _auto_maps(todo: list[Photo], source: Path, out: Path, maps: Maps, model: str | None, device, batch_size: int):
    """`--semantic auto`: the maps of the photos to do, made by the panoptic segmenter into out/.vis2ir/semantic_auto."""
    from vis2ir.config import DEFAULT_SEGMENTER
    from vis2ir.segment import ensure_maps

    maps.root = state_dir(out) / "semantic_auto"
    failed = ensure_maps([(_stem(p.rel), source / p.rel, maps.root) for p in todo], model or DEFAULT_SEGMENTER,
                         device, batch_size, setting="--segment-model")
    if failed:
        name, why = next(iter(failed.items()))
        log.warning("--semantic auto: %d photos have no map (e.g. %s: %s): they fail", len(failed), name, why)


def _settings(cfg: Config, checkpoint, lay: Layout, maps: Maps, box_classes, size, image_format: str, bit_depth: int,
              palette: str, steps, guidance, seed) -> dict:
    """What decides the output images, recorded at the first run and compared at every later one: the weights
    (a checkpoint's identity), the model's settings as this run has them (overrides such as `model.quantize`
    included), the maps and their class mapping, sampling and the output format."""
    s = cfg.sample.replaced(steps=steps, guidance=guidance, seed=seed)
    text = json.dumps(dataclasses.asdict(cfg.model), sort_keys=True, default=str)
    config = f"sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    model = f"checkpoint sha256:{checkpoint_identity(find_checkpoint(checkpoint))[:16]}" if checkpoint else "config"
    sampling = {k: v for k, v in dataclasses.asdict(s).items() if k not in ("compile", "compile_mode", "vae_tiling")}
    return {"model": model, "model_config": config, "source": str(lay.root.resolve()), "layout": lay.kind,
            "semantic": maps.describe(), "box_classes": sorted(box_classes), "sample": sampling,
            "size": s.size if size is None else size, "format": image_format, "bit_depth": bit_depth,
            "palette": palette}
