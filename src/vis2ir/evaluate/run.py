"""`vis2ir evaluate`: score a folder of predictions against a folder of truths, or a checkpoint on a
data source's split (generate, then score), and write the reports (`report.py`).

Folders are paired by file stem (`a.png` ↔ `a.jpg`); semantic maps, when given, are decoded with
the palette into classes for the per-class metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vis2ir.config import Config, load_config
from vis2ir.data.palette import decode_classes
from vis2ir.errors import Vis2IRError
from vis2ir.evaluate.baselines import sample_classes
from vis2ir.evaluate.report import write_report
from vis2ir.evaluate.scoring import Scorer
from vis2ir.files import safe_join
from vis2ir.pipeline import list_images, read_image, to_tensor

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Folders


def is_grey(image: torch.Tensor, tolerance: float = 2 / 255) -> bool:
    """Whether the three channels of `[3, H, W]` agree (grey replicated, as infrared should be)."""
    return bool((image.amax(0) - image.amin(0)).max() <= tolerance)


def pair_folders(pred: str | Path, truth: str | Path, semantic: str | Path | None = None) -> list[tuple]:
    """`(name, pred path, truth path, semantic path or None)` for every truth image, by file stem."""
    folders = {"--pred": Path(pred), "--truth": Path(truth)} | ({"--semantic": Path(semantic)} if semantic else {})
    found = {}
    for option, folder in folders.items():
        if not folder.is_dir():
            raise Vis2IRError(f"{option} {folder}: no such folder")
        found[option] = {p.stem: p for p in list_images(folder)}
    truths = found["--truth"]
    if not truths:
        raise Vis2IRError(f"--truth {truth}: no images in this folder")
    for option in [o for o in found if o != "--truth"]:
        missing = sorted(set(truths) - set(found[option]))
        if missing:
            raise Vis2IRError(f"{option} {folders[option]}: no image named like {len(missing)} of the "
                              f"{len(truths)} truth images, e.g. {missing[0]}.*")
    extra = set(found["--pred"]) - set(truths)
    if extra:
        log.warning("--pred: %d predictions have no truth image and are not scored, e.g. %s", len(extra), min(extra))
    sem = found.get("--semantic", {})
    return [(name, found["--pred"][name], path, sem.get(name)) for name, path in sorted(truths.items())]


def evaluate_folders(pred: str | Path, truth: str | Path, semantic: str | Path | None = None,
                     out: str | Path = "outputs/evaluate", config: str | Path | None = None,
                     overrides=(), device=None) -> dict:
    """Score the predictions in `pred` against `truth` (and per class with `semantic`); write the reports."""
    cfg = load_config(config, overrides)
    pairs = pair_folders(pred, truth, semantic)
    scorer = Scorer(cfg.eval, device or "cpu")
    coloured = []
    for name, p, t, s in tqdm(pairs, desc="evaluate", unit="img"):
        classes = decode_classes(to_tensor(read_image(s), str(s))) if s else None
        prediction = to_tensor(read_image(p), str(p))
        if not is_grey(prediction):
            coloured.append(p.name)
        scorer.add(name, prediction, to_tensor(read_image(t), str(t)), classes)
    if coloured:  # e.g. `generate --palette ironbow`: the channel mean is not the intensity
        log.warning("%d predictions are in colour (first: %s); infrared is scored as the mean of the "
                    "channels, so palette images (ironbow, ...) give wrong figures: score grey outputs",
                    len(coloured), coloured[0])
    source = {"pred": str(pred), "truth": str(truth), "semantic": str(semantic) if semantic else None}
    result = scorer.result() | {"source": source}
    return _finish(result, out)


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
    from vis2ir.pipeline import Vis2IRPipeline, default_device

    directory = find_checkpoint(checkpoint)
    pipe = pipe or Vis2IRPipeline.from_checkpoint(directory, default_device(device), overrides=overrides,
                                                  config=config)
    cfg = load_config(config, overrides) if config else pipe.cfg
    limit = limit or cfg.eval.limit
    started = time.perf_counter()
    dataset = split_dataset(cfg, split, pipe.needs_semantic)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    scorer = Scorer(cfg.eval, pipe.device)
    seeds = [pipe.cfg.sample.seed + k for k in range(cfg.eval.noise_draws)]
    for k, seed in enumerate(seeds):  # the first draw's predictions are saved
        desc = "generate" if len(seeds) == 1 else f"generate (draw {k + 1}/{len(seeds)})"
        with tqdm(total=count, desc=desc, unit="img") as bar:
            for batch in batches(dataset, count, cfg.eval.batch_size):
                predictions = predict(pipe, batch, Path(out) / "pred" if k == 0 else None, seed)
                for sample, pred in zip(batch, predictions):
                    scorer.add(sample["name"], pred, sample["infrared"], sample_classes(sample), draw=k)
                bar.update(len(batch))
    result = scorer.result() | {"source": {"checkpoint": str(directory), "data": cfg.data.source, "split": split},
                                "seeds": seeds, "seconds": round(time.perf_counter() - started, 1)}
    return _finish(result, out)


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


def predict(pipe, batch: list[dict], out: Path | None = None, seed: int | None = None) -> list[torch.Tensor]:
    """Infrared predictions `[3, H, W]` in [0, 1] for one batch of samples (noise from `seed`, else
    `sample.seed`); also saved as `out/<name>.png` (names are checked to stay inside `out`)."""
    from vis2ir.visualize import infrared_image, write_png

    sem = [s["semantic"] for s in batch] if pipe.needs_semantic else None
    images = pipe([s["visible"] for s in batch], sem, seed=seed, batch_size=len(batch), output_type="pt").images
    if out is not None:
        for sample, image in zip(batch, images):
            write_png(safe_join(out, sample["name"], ".png"), infrared_image(image.mean(0).numpy()))
    return list(images)


def _finish(result: dict, out: str | Path) -> dict:
    path = write_report(result, out)
    m = result["metrics"]
    log.info("%d images: PSNR %.2f dB, SSIM %.3f (ThermalGen 256×256); native PSNR %.2f dB, SSIM %.3f; "
             "LPIPS %s; FID %s -> %s", result["images"], m["psnr"], m["ssim"], m["psnr_native"], m["ssim_native"],
             _opt(m.get("lpips")), _opt(m.get("fid")), path)
    return result


def _opt(value) -> str:
    return "skipped" if value is None else f"{value:.4g}"
