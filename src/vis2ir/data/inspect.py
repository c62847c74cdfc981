"""`vis2ir data inspect`: what a source holds, what is wrong with it, and a contact sheet to look at."""

from __future__ import annotations

import dataclasses
import logging
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure

from vis2ir.config import DataConfig
from vis2ir.data.coverage import mostly_void_problem, void_share
from vis2ir.data.dataset import PanelDataset, maps_help, no_boxes_in_thermalscenes, open_source, scan
from vis2ir.data.errors import DataError
from vis2ir.data.folders import FileReader
from vis2ir.data.splits import SPLITS, hash_split
from vis2ir.data.images import loader_description
from vis2ir.figures import image_grid, save_figure, semantic_ids

log = logging.getLogger(__name__)

THUMB = 160  # panel size on the contact sheet
SHOWN = 20  # problems listed (then "… and N more")
TABLE_CHECKS = 500  # table rows whose headers are read (folders: every file)
PIXEL_CHECKS = 64  # samples decoded (at thumbnail size) to find what headers cannot tell: colour-mapped
# infrared, semantic maps that are not palette colours, undecodable data


def inspect_source(cfg: DataConfig, out: str | Path | None = None, count: int = 8, mode: str | None = None) -> dict:
    """Log counts per split, panel sizes, semantic coverage and problems; write a contact sheet of
    `count` triptychs to `out` (PNG) when given. Returns the same facts as a dict.

    `mode`: the semantic mode the data is meant for (`model.semantic.mode`, or 'any' when no config chose one);
    unless it is None or 'none', samples without a semantic map are a problem (with `data.semantic_source: files`)."""
    no_boxes_in_thermalscenes(cfg)
    if cfg.source == "thermalscenes":
        report, samples = _inspect_thermalscenes(cfg, count)
    else:
        report, samples = _inspect_files(cfg, count, mode)
    total = sum(report["counts"].values())
    log.info("source: %s (%s)", cfg.source, report["layout"])
    log.info("samples: %s", ", ".join(f"{s} {report['counts'][s]}" for s in SPLITS))
    log.info("panel sizes (visible): %s", ", ".join(f"{k} x{v}" for k, v in report["sizes"].items()) or "-")
    auto = cfg.semantic_source == "auto" and report["semantic"] < total
    boxes = f" (drawn from the {report['boxes']} boxes in {cfg.boxes})" if report.get("boxes") else ""
    log.info("semantic maps: %d of %d%s%s", report["semantic"], total, boxes,
             " (data.semantic_source=auto makes the missing ones on first use)" if auto else "")
    if report.get("skipped"):
        log.info("skipped files: %s", report["skipped"])
    problems = report["problems"]
    more = f"\n  … and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    log.info("problems: %d%s%s", len(problems), "".join(f"\n  {p}" for p in problems[:SHOWN]), more)
    if out is not None:
        if Path(out).suffix.lower().lstrip(".") not in FigureCanvasBase.get_supported_filetypes():
            raise DataError(f"contact sheet {out}: unknown image suffix (use .png or .jpg)")
        save_figure(Path(out).expanduser(), contact_sheet(samples, cfg.source, loader_description(cfg, "val")))
        report["sheet"] = str(out)
        log.info("contact sheet: %s (%d triptychs)", out, len(samples))
    return report


def contact_sheet(samples: list[dict], source: str = "", loading: str = "") -> Figure:
    """One row per sample (named, with its split), columns visible | infrared | semantic as the loader
    prepares them; the title names the source and says what the loader does (`loading`, e.g.
    `data.images.loader_description`); a legend of the semantic classes shown."""
    if not samples:
        raise DataError("contact sheet: none of the samples checked could be read (their problems are listed "
                        "above), so there is nothing to show")
    kinds = ("visible", "infrared", "semantic")
    cells = [[_pixels(sample[kind]) if kind in sample else None for kind in kinds] for sample in samples]
    shown = [c[2] for c in cells if c[2] is not None]
    title = (f"{source}: {len(samples)} samples as the loader prepares them (shown at {THUMB} px)"
             + (f"\n{textwrap.fill(loading, 110)}" if loading else ""))
    return image_grid(cells, title=title, column_labels=list(kinds), cell=THUMB, missing="no semantic map",
                      row_labels=[f"{s['name']}\n[{s.get('split', '')}]" for s in samples],
                      legend_ids=semantic_ids(shown) if shown else ())


def _pixels(image) -> np.ndarray:
    """A `[3, H, W]` tensor in [0, 1] → uint8 RGB `[H, W, 3]`."""
    return np.ascontiguousarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def _inspect_files(cfg: DataConfig, count: int, mode: str | None) -> tuple[dict, list[dict]]:
    found, reader = open_source(cfg)
    records = found.records
    checked = records if isinstance(reader, FileReader) else records[:: max(1, len(records) // TABLE_CHECKS)]
    problems, sizes = list(found.problems), Counter()
    good = scan(checked, reader, None, problems, desc="checking files", sizes=sizes)
    if isinstance(reader, FileReader):
        semantic = sum(r.semantic is not None or r.triptych is not None for r in records)
    else:
        semantic = len(records) if reader.has_semantic else 0
    if mode not in (None, "none") and cfg.semantic_source != "auto" and semantic < len(records):
        why = [found.no_map(r, found.root / cfg.semantic_dir) for r in records if r.name in found.map_problems]
        problems[:0] = [_missing_maps_problem(cfg, found, reader, mode), *why]  # and why a map was not taken
    report = {"layout": found.layout, "counts": {s: sum(r.split == s for r in records) for s in SPLITS},
              "sizes": {f"{w}x{h}": n for (w, h), n in sizes.most_common(5)}, "semantic": semantic,
              "problems": problems, "skipped": found.skipped,
              "boxes": reader.boxes.layout if isinstance(reader, FileReader) and reader.boxes else None}
    thumbs = dataclasses.replace(cfg, size=THUMB, hflip=False, on_bad_sample="skip",
                                 resize_policy="resize" if cfg.resize_policy == "resize" else "center_crop")
    checks = min(max(count, PIXEL_CHECKS), len(good))
    decoded = [good[k * len(good) // checks] for k in range(checks)]
    samples = []
    for record in decoded:
        try:
            sample = PanelDataset([record], reader, thumbs, "val", semantic=None).load(0)
        except DataError as err:
            problems.append(str(err))
            continue
        samples.append({**sample, "split": record.split})
    shares = {str(s["name"]): void_share(s["semantic"]) for s in samples if "semantic" in s}
    void = mostly_void_problem(shares, len(shares), str(cfg.source))
    if void:
        problems.append(void)
    if len(samples) > count:  # the sheet: `count` of them, spread over the source
        samples = [samples[k * len(samples) // count] for k in range(count)]
    return report, samples


def _missing_maps_problem(cfg: DataConfig, found, reader, mode: str) -> str:
    """One problem line for the samples that lack the semantic map `mode` needs, with the ways out."""
    needs = ("a semantic mode (any model.semantic.mode but none) needs them" if mode == "any"
             else f"model.semantic.mode={mode} needs them")
    if not isinstance(reader, FileReader):
        return (f"{cfg.source}: no semantic column {cfg.semantic_column!r} (data.semantic_column); {needs}: "
                f"{maps_help(cfg, found)}")
    lacking = [r for r in found.records if r.semantic is None and r.triptych is None]
    return (f"{lacking[0].visible}: no semantic map in {found.root / cfg.semantic_dir}, nor for {len(lacking) - 1} "
            f"more of the {len(found.records)} samples; {needs}: {maps_help(cfg, found)}")


def _inspect_thermalscenes(cfg: DataConfig, count: int) -> tuple[dict, list[dict]]:
    from vis2ir.data.synth import ThermalScenes, split_indices

    counts = {s: len(split_indices(cfg.synth_count, s, cfg.val_fraction, cfg.test_fraction)) for s in SPLITS}
    report = {"layout": f"synthetic, seed {cfg.synth_seed}", "counts": counts,
              "sizes": {f"{cfg.size}x{cfg.size}": cfg.synth_count}, "semantic": cfg.synth_count, "problems": []}
    scenes = ThermalScenes(min(count, cfg.synth_count), THUMB, cfg.synth_seed)
    samples = [scenes[i] for i in range(len(scenes))]
    for sample in samples:
        sample["split"] = hash_split(sample["name"], cfg.val_fraction, cfg.test_fraction)
    return report, samples
