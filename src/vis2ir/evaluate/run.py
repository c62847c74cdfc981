"""`vis2ir evaluate`: score a folder of predictions against a folder of truths, or a checkpoint on a
data source's split (generate, then score), and write the reports (`report.py`).

Folders are paired by name (`a.png` ↔ `a.jpg`; with `--recursive`, by path under the folder:
`io.inputs.match_partners`; hidden files ignored); semantic maps, when given, are decoded with the
palette into classes for the per-class metrics. Images are read as everywhere (`vis2ir.io.images`):
upright, 16-bit and float truths normalised by the config's `data.ir_normalize` exactly as the data
loader does, and predictions too, except vis2ir's own 16-bit outputs, which say they are full-range
(`--pred-values` overrides). A file that cannot be read, or a prediction that
is not finite, is a failed item: reported, left out of the scores, and listed in one error at the end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vis2ir.config import PRED_VALUES, Config, load_config
from vis2ir.palette import decode_classes
from vis2ir.errors import Vis2IRError
from vis2ir.evaluate.baselines import sample_classes
from vis2ir.evaluate.report import write_report
from vis2ir.evaluate.scoring import Scorer
from vis2ir.files import safe_join
from vis2ir.data.coverage import warn_mostly_void
from vis2ir.io.images import Normaliser, is_finite, read_image, to_tensor
from vis2ir.io.inputs import image_name, list_images, match_partners, printable, skipped_note

log = logging.getLogger(__name__)
STRIP_IMAGES = 4  # images in strip.png
THERMALGEN = ("ThermalGen: both resized to 256×256 (bilinear), the protocol of the field's published figures; "
              "a non-square image is squashed to the square (its aspect ratio is not kept)")


# ----------------------------------------------------------------------------------------------
# Folders


def is_grey(image: torch.Tensor, tolerance: float = 2 / 255) -> bool:
    """Whether the three channels of `[3, H, W]` agree (grey replicated, as infrared should be)."""
    return bool((image.amax(0) - image.amin(0)).max() <= tolerance)


def pair_folders(pred: str | Path, truth: str | Path, semantic: str | Path | None = None,
                 recursive: bool = False) -> list[tuple]:
    """`(name, pred path, truth path, semantic path or None)` for every truth image (with `recursive`, of
    the sub-folders of `truth` too, named by relative path): the prediction and map of the same name
    (`io.inputs.match_partners`: same relative path, or bare name in a flat folder; any image suffix). A
    truth without a prediction (or map), or with several, is a `Vis2IRError` naming the first."""
    folders = {"--pred": Path(pred), "--truth": Path(truth)} | ({"--semantic": Path(semantic)} if semantic else {})
    for option, folder in folders.items():
        if not folder.is_dir():
            raise Vis2IRError(f"{option} {folder}: no such folder")
    truths: dict[str, Path] = {}
    others: list[Path] = []
    for path in list_images(folders["--truth"], recursive=recursive, skipped=others):
        name = image_name(path, folders["--truth"])
        if name in truths:
            raise Vis2IRError(f"--truth {truth}: {truths[name]} and {path} are both the truth of {name}; keep one")
        truths[name] = path
    if others:  # truths of formats not read (HEIC, ...) are named, not left out in silence
        log.warning("--truth %s: %s", truth, printable(skipped_note(others)))
    if not truths:
        nested = not recursive and any(p.is_dir() for p in folders["--truth"].iterdir())
        raise Vis2IRError(f"--truth {truth}: no images in this folder"
                          + (" (it has sub-folders: --recursive takes their images too)" if nested else ""))
    found = {}
    for option in [o for o in folders if o != "--truth"]:
        partners = match_partners(truths, folders[option], "image", recursive)
        if partners.missing:
            first = partners.missing[0]
            why = f" ({partners.problem(first)})" if first in partners.unreadable else ""
            raise Vis2IRError(f"{option} {folders[option]}: no image named like {len(partners.missing)} of the "
                              f"{len(truths)} truth images, e.g. {printable(first)}.*{printable(why)}")
        if partners.ambiguous:
            raise Vis2IRError(f"{option} {folders[option]}: {len(partners.ambiguous)} of the {len(truths)} truth "
                              f"images have no single image to go with: {next(iter(partners.ambiguous.values()))}")
        found[option] = partners
    if found["--pred"].unmatched:
        extra = found["--pred"].unmatched
        log.warning("--pred: %d predictions have no truth image and are not scored, e.g. %s", len(extra), extra[0])
    sem = found["--semantic"].found if "--semantic" in found else {}
    return [(name, found["--pred"].found[name], path, sem.get(name)) for name, path in sorted(truths.items())]


def evaluate_folders(pred: str | Path, truth: str | Path, semantic: str | Path | None = None,
                     out: str | Path = "outputs/evaluate", config: str | Path | None = None,
                     overrides=(), device=None, recursive: bool = False, pred_values: str = "auto") -> dict:
    """Score the predictions in `pred` against `truth` (and per class with `semantic`); write the reports.
    `recursive`: the truths of `truth`'s sub-folders too (`pair_folders`). `pred_values` (`PRED_VALUES`):
    how 16-bit and float predictions become [0, 1] (`prediction_reading`). Failed items (unreadable,
    or a prediction that is not finite) are left out, then raised as one error."""
    if pred_values not in PRED_VALUES:
        raise Vis2IRError(f"--pred-values: {pred_values!r} is not one of {', '.join(PRED_VALUES)}")
    cfg = load_config(config, overrides)
    pairs = pair_folders(pred, truth, semantic, recursive)
    scorer = Scorer(cfg.eval, device or "cpu", examples=STRIP_IMAGES)
    normaliser = Normaliser.of(cfg.data)
    coloured, failed = [], {}
    for name, p, t, s in tqdm(pairs, desc="evaluate", unit="img"):
        try:
            sem_map = to_tensor(read_image(s), str(s)) if s else None
            classes = decode_classes(sem_map) if s else None
            if s:  # per-class figures from maps drawn from boxes cover little: said once
                warn_mostly_void(printable(str(s)), sem_map)
            raw = read_image(p)
            if not is_finite(np.asarray(raw)):  # a float TIFF from a broken model
                raise Vis2IRError(f"{p}: the prediction is not finite (NaN/inf)")
            prediction = to_tensor(raw, str(p), *prediction_reading(normaliser, pred_values))
            target = to_tensor(read_image(t), str(t), normaliser)
        except Vis2IRError as err:
            log.error("%s", err)
            failed[printable(name)] = printable(str(err))
            continue
        if not is_grey(prediction):
            coloured.append(printable(p.name))
        scorer.add(printable(name), prediction, target, classes)  # a name that is not UTF-8: escaped in reports
    if coloured:  # e.g. `generate --palette ironbow`: the channel mean is not the intensity
        log.warning("%d predictions are in colour (first: %s); infrared is scored as the mean of the "
                    "channels, so palette images (ironbow, ...) give wrong figures: score grey outputs",
                    len(coloured), coloured[0])
    if len(failed) == len(pairs):
        raise Vis2IRError(f"--pred {pred}: no pair could be scored (first: {next(iter(failed.values()))})")
    from vis2ir.data.images import normalisation_description

    source = {"pred": str(pred), "truth": str(truth), "semantic": str(semantic) if semantic else None}
    values = normalisation_description(cfg.data)
    read = {"auto": f"16-bit ones vis2ir wrote (marked full-range) as value/65535, others {values}",
            "full-range": "16-bit as value/65535, float as it is (--pred-values full-range)",
            "ir-normalize": f"{values} (--pred-values ir-normalize)"}[pred_values]
    scored = {"prediction": f"the files in --pred ({read}); one resized (bilinear) to its truth's size where "
                            "they differ; grey: the mean of the channels",
              "truth": f"the files in --truth at their own size ({values}; 16-bit ones vis2ir wrote, marked "
                       "full-range, as value/65535)",
              "resolution": f"native: each truth's own size; {THERMALGEN}"}
    return _finish_with_failures(scorer.result() | {"source": source, "scored": scored}, out, scorer, failed,
                                 len(pairs), "pairs")


def prediction_reading(normaliser: Normaliser, values: str = "auto") -> tuple[Normaliser | None, bool]:
    """`to_tensor`'s (normaliser, honour_mark) for predictions under `--pred-values`: `auto` reads them as the
    truths (`normaliser`: `data.ir_normalize`, raw sensor counts, e.g. another method's outputs) except vis2ir's
    own marked 16-bit outputs, at full range (`io.images.is_full_range`); `full-range` reads every 16-bit one as
    value / 65535 and float ones as they are (normaliser None); `ir-normalize` reads all by `normaliser`, the
    mark ignored."""
    if values == "full-range":
        return None, True
    return normaliser, values != "ir-normalize"


# ----------------------------------------------------------------------------------------------
# A checkpoint on a split


def evaluate_checkpoint(checkpoint: str | Path, config: str | Path | None = None, overrides=(),
                        split: str = "test", limit: int | None = None, out: str | Path = "outputs/evaluate",
                        device=None, pipe=None) -> dict:
    """Generate with the checkpoint on `split` of the data source (the checkpoint's `data` section, or
    `config`'s), write the predictions to `out/pred/`, score them, and write the reports. `pipe`: the
    checkpoint's pipeline, when the caller has already loaded it.

    Streams: each batch of `eval.batch_size` samples is read, generated, saved and scored, then
    dropped, so memory does not grow with the split (the scorer keeps per-image rows and features)."""
    from vis2ir.checkpoint import find_checkpoint
    from vis2ir.files import check_writable

    check_writable(out, "--out")  # before the model loads
    from vis2ir.data.images import loader_description
    from vis2ir.io.runtime import default_device
    from vis2ir.pipeline import NOT_FINITE, Vis2IRPipeline

    directory = find_checkpoint(checkpoint)
    pipe = pipe or Vis2IRPipeline.from_checkpoint(directory, default_device(device), overrides=overrides,
                                                  config=config)
    cfg = load_config(config, overrides) if config else pipe.cfg
    limit = limit or cfg.eval.limit
    started = time.perf_counter()
    dataset = split_dataset(cfg, split, pipe.needs_semantic)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    scorer = Scorer(cfg.eval, pipe.device, examples=STRIP_IMAGES)
    seeds = [pipe.cfg.sample.seed + k for k in range(cfg.eval.noise_draws)]
    failed: dict[str, str] = {}
    for k, seed in enumerate(seeds):  # the first draw's predictions are saved
        desc = "generate" if len(seeds) == 1 else f"generate (draw {k + 1}/{len(seeds)})"
        with tqdm(total=count, desc=desc, unit="img") as bar:
            for batch in batches(dataset, count, cfg.eval.batch_size):
                predictions = predict(pipe, batch, Path(out) / "pred" if k == 0 else None, seed)
                for sample, pred in zip(batch, predictions):
                    if pred is None:  # not finite: reported by predict, not scored, listed at the end
                        name = sample["name"] if k == 0 else f"{sample['name']} (draw {k})"
                        failed[printable(name)] = NOT_FINITE
                        continue
                    scorer.add(printable(sample["name"]), pred, sample["infrared"], sample_classes(sample), draw=k)
                bar.update(len(batch))
    if cfg.data.resize_policy == "bucket" and cfg.data.source != "thermalscenes":
        shapes = sorted({f"{w}×{h}" for w, h in dataset.shapes[:count]})
        size = f"each sample's aspect-ratio bucket ({', '.join(shapes[:8])}{', …' if len(shapes) > 8 else ''})"
    else:
        size = f"{cfg.data.size}×{cfg.data.size}"
    recursive = " --recursive" if any("/" in row["name"] for row in scorer.rows) else ""  # names like test/x
    scored = {"prediction": f"generated at {size}, rounded to 8 bits exactly as saved in pred/ (grey)",
              "truth": f"the data loader's {split!r} samples of {cfg.data.source}: {loader_description(cfg.data, split)}",
              "resolution": f"native: {size}; {THERMALGEN}",
              "same figures": f"`vis2ir evaluate --pred {Path(out) / 'pred'} --truth T{recursive}` scores the same "
                              f"when T holds these truths at {size} (e.g. a folder source already at that size)"}
    if len(failed) == count * len(seeds):
        raise Vis2IRError(f"--checkpoint {directory}: no prediction could be scored ({NOT_FINITE})")
    result = scorer.result() | {"source": {"checkpoint": str(directory), "data": cfg.data.source, "split": split},
                                "scored": scored, "seeds": seeds, "seconds": round(time.perf_counter() - started, 1)}
    return _finish_with_failures(result, out, scorer, failed, count * len(seeds), "predictions")


def _finish_with_failures(result: dict, out, scorer, failed: dict[str, str], total: int, what: str) -> dict:
    """Write the reports (with the failed items listed), then raise one error naming them, if any."""
    result = result | ({"failed": failed} if failed else {})
    _finish(result, out, scorer.examples)
    if failed:
        listed = "; ".join(f"{k} ({v})" for k, v in list(failed.items())[:5])
        raise Vis2IRError(f"{len(failed)} of {total} {what} failed and were not scored (the report covers "
                          f"the others, {out}): {listed}")
    return result


def split_dataset(cfg: Config, split: str, needs_semantic: bool):
    """The dataset of `split` (semantic maps included whenever the source has them)."""
    from vis2ir.data import build_dataset

    return build_dataset(cfg.data, split, require_semantic=True if needs_semantic else None)


def batches(dataset, count: int, batch_size: int) -> Iterator[list[dict]]:
    """The first `count` samples of `dataset`, read `batch_size` at a time (one batch held at once)."""
    for start in range(0, count, batch_size):
        yield [dataset[i] for i in range(start, min(start + batch_size, count))]


def iter_split(cfg: Config, split: str, limit: int | None, needs_semantic: bool,
               batch_size: int | None = None) -> Iterator[dict]:
    """The first `limit` samples of `split`, one at a time, read `batch_size` (`eval.batch_size`) at a time."""
    dataset = split_dataset(cfg, split, needs_semantic)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    for batch in batches(dataset, count, batch_size or cfg.eval.batch_size):
        yield from batch


def load_split(cfg: Config, split: str, limit: int, needs_semantic: bool) -> list[dict]:
    """The first `limit` samples of `split` as a list: for a few samples (pictures), not a whole split."""
    return list(iter_split(cfg, split, limit, needs_semantic))


def predict(pipe, batch: list[dict], out: Path | None = None, seed: int | None = None) -> list[torch.Tensor | None]:
    """Infrared predictions `[3, H, W]` in [0, 1] for one batch of samples (noise from `seed`, else
    `sample.seed`), grey and rounded to 8 bits as saved: `out/<name>.png` (names are checked to stay
    inside `out`), so what is scored is what `evaluate --pred` reads back. A prediction that is not
    finite is None (logged, nothing written)."""
    from vis2ir.io.images import write_png
    from vis2ir.pipeline import NOT_FINITE, NonFiniteOutput
    from vis2ir.visualize import infrared_image

    sem = [s["semantic"] for s in batch] if pipe.needs_semantic else None
    try:
        images = pipe([s["visible"] for s in batch], sem, seed=seed, batch_size=len(batch), output_type="pt").images
    except NonFiniteOutput as err:
        images = err.output.images
        for k in err.bad:
            log.error("%s: %s", batch[k]["name"], NOT_FINITE)
    saved = []
    for sample, image in zip(batch, images):
        if image is None:
            saved.append(None)
            continue
        grey = infrared_image(image.mean(0).numpy())  # uint8 [H, W]
        if out is not None:
            write_png(safe_join(out, sample["name"], ".png"), grey, full_range=True)
        saved.append(torch.from_numpy(grey.astype(np.float32) / 255.0)[None].expand(3, -1, -1))
    return saved


def _finish(result: dict, out: str | Path, examples=()) -> dict:
    path = write_report(result, out, examples)
    m = result["metrics"]
    log.info("%d images: PSNR %.2f dB, SSIM %.3f (ThermalGen 256×256); native PSNR %.2f dB, SSIM %.3f; "
             "LPIPS %s; FID %s -> %s", result["images"], m["psnr"], m["ssim"], m["psnr_native"], m["ssim_native"],
             _opt(m.get("lpips")), _opt(m.get("fid")), path)
    return result


def _opt(value) -> str:
    return "skipped" if value is None else f"{value:.4g}"
