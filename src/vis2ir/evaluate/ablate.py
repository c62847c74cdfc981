"""`vis2ir ablate`: train and evaluate every variant of a grid of settings, and tabulate them.

    out/
      variants/<name>/run/           the variant's training run (`vis2ir.train.train`)
      variants/<name>/trained.json   written when its training ended (a rerun does not train again)
      variants/<name>/eval/          its evaluation on the test split (`evaluate_checkpoint`)
      variants/<name>/attention/     cross-attention variants: where the adapter looks, on two test scenes
      variants/<name>/result.json    written last: a variant with this file is finished and skipped
      references.json                the reference predictors (class-mean oracle, visible lookup, constant)
      results.md, results.csv        mean ± spread (sample standard deviation) over seeds
      results.png                    PSNR and the look-alike classes' errors per row
      samples.png                    the first test scenes: visible, semantic, truth, each row's prediction

Every variant shares the base config, data and step budget; it differs only by its grid values and
its seed (`train.seed` and `model.seed`). `--grid KEY=V1,V2` gives one grid (the product of its
keys' values); `--plan FILE` gives several, as a YAML list of `{key: [values]}` mappings, when the
rows of a table are not one product (e.g. modes, then the adapter's settings for one mode). `--shard i/n` runs every n-th variant from i, so n
processes (one per GPU) share a grid; `--collect` only tabulates the results found.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vis2ir.config import Config, load_config
from vis2ir.errors import Vis2IRError
from vis2ir.evaluate.metrics import LOOKALIKE_CLASSES
from vis2ir.evaluate.report import csv_text, fmt, markdown_table
from vis2ir.files import safe_join, write_json, write_text

log = logging.getLogger(__name__)

REFERENCES = ("class_oracle", "visible_lookup", "constant")
METRICS = ("psnr", "ssim", "psnr_native", "lpips", "fid")
RESULT_FILE = "result.json"
TRAINED_FILE = "trained.json"  # written when training returns: a rerun only evaluates


@dataclass
class Variant:
    name: str            # folder name: the grid values and the seed
    group: str           # the row of the table: the grid values without the seed
    overrides: list[str]
    seed: int


# ----------------------------------------------------------------------------------------------
# The grid


def split_values(text: str) -> list[str]:
    """`a,b,[1,2]` → `['a', 'b', '[1,2]']`: commas inside brackets or braces do not split."""
    values, depth, current = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    values.append(current.strip())
    return values


def parse_grid(items) -> list[tuple[str, list[str]]]:
    """`["KEY=V1,V2", …]` → `[(KEY, [V1, V2]), …]`."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise Vis2IRError(f"--grid {item!r}: expected KEY=V1,V2,..., "
                              "e.g. --grid model.semantic.mode=none,in_context")
        grid.append((key.strip(), [v for v in split_values(values) if v]))
    return grid


def parse_seeds(text: str) -> list[int]:
    """`--seeds 0,1`: the seeds (each becomes train.seed and model.seed, so bounded as they are)."""
    from vis2ir.config import SEED_EXPECTED, SEED_LIMIT

    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise Vis2IRError(f"--seeds {text!r}: expected integers separated by commas, e.g. 0,1") from None
    bad = [s for s in seeds if not 0 <= s < SEED_LIMIT]
    if bad:
        raise Vis2IRError(f"--seeds {text!r}: each seed must be {SEED_EXPECTED}, got {bad[0]}")
    return seeds


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not int(m[1]) < int(m[2]):
        raise Vis2IRError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. --shard 0/4")
    return int(m[1]), int(m[2])


def load_plan(path: str | Path) -> list[list[tuple[str, list[str]]]]:
    """A plan file: a YAML list of grids, each a mapping `key: [values]` (a single value is a list of one)."""
    from vis2ir.config import read_yaml
    from vis2ir.config.yamltext import Texts

    if not Path(path).is_file():
        raise Vis2IRError(f"--plan {path}: cannot read it (no such file)")
    texts = Texts()  # plain scalars as written (`0755`, `yes`): the override reads them for the setting's type
    plan = read_yaml(path, texts)
    if not isinstance(plan, list) or not plan or not all(isinstance(g, dict) and g for g in plan):
        raise Vis2IRError(f"--plan {path}: expected a YAML list of mappings KEY: [V1, V2, ...], "
                          "e.g. '- {model.semantic.mode: [none, in_context]}'")

    def values(grid: dict, key) -> list[str]:
        given = grid[key]
        if isinstance(given, list):
            return [texts.of(given, i) or _plan_value(v) for i, v in enumerate(given)]
        return [texts.of(grid, key) or _plan_value(given)]

    return [[(str(k), values(g, k)) for k in g] for g in plan]


def _plan_value(value) -> str:
    """A YAML value as the text of a `key=value` override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if not isinstance(value, (list, dict)) else json.dumps(value)


def make_variants(grid: list[tuple[str, list[str]]], seeds: list[int]) -> list[Variant]:
    """The cartesian product of the grid's values, times the seeds."""
    keys = [k for k, _ in grid]
    out = []
    for values in itertools.product(*[v for _, v in grid]):
        group = "__".join(f"{k.rsplit('.', 1)[-1]}={_safe(v)}" for k, v in zip(keys, values)) or "base"
        for seed in seeds:
            overrides = [f"{k}={v}" for k, v in zip(keys, values)] + [f"train.seed={seed}", f"model.seed={seed}"]
            out.append(Variant(f"{group}__seed={seed}", group, overrides, seed))
    check_unique(out)
    return out


def plan_variants(grids: list[list[tuple[str, list[str]]]], seeds: list[int]) -> list[Variant]:
    """Every grid's variants, in order (a row that several grids give is run once)."""
    out, seen = [], set()
    for grid in grids:
        for v in make_variants(grid, seeds):
            if v.name not in seen:
                seen.add(v.name)
                out.append(v)
    return out


def check_unique(variants: list[Variant]) -> None:
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise Vis2IRError("--grid: two variants get the same folder name; use keys whose last parts differ")


def _safe(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", value).strip("-") or "empty"


# ----------------------------------------------------------------------------------------------
# Running


def run_ablation(config: str | Path, grid_items, seeds: str = "0", out: str | Path = "runs/ablate", overrides=(),
                 shard: str = "0/1", collect: bool = False, device=None, progress: bool = True,
                 plan: str | Path | None = None) -> Path:
    """Run this process's share of the variants (skipping finished ones), then tabulate; returns results.md."""
    out = Path(out)
    planned = load_plan(plan) if plan else []
    grids = ([parse_grid(grid_items)] if grid_items or not plan else []) + planned
    seed_list = parse_seeds(seeds)
    if device is not None:
        from vis2ir.io.runtime import default_device

        default_device(device)  # a bad --device is answered before the first variant trains
    variants = plan_variants(grids, seed_list)
    base = load_config(config, overrides)
    for v in plan_variants(planned, seed_list) if planned else []:  # a bad value of the plan names the plan file
        try:
            load_config(config, [*overrides, *v.overrides])
        except Vis2IRError as err:
            raise Vis2IRError(f"--plan {plan}: {err}") from None
    for v in variants:  # every variant's settings are checked before the first one trains
        load_config(config, [*overrides, *v.overrides])
    rank, world = parse_shard(shard)
    if not collect:
        mine = variants[rank::world]
        log.info("Ablation: %d variants (%d seeds), %d in this process (shard %d/%d) -> %s", len(variants),
                 len(seed_list), len(mine), rank, world, out)
        for i, v in enumerate(mine, 1):
            run_variant(config, overrides, v, out, f"[{i}/{len(mine)}]", device, progress)
    if collect or rank == 0:  # once (cached); several shards at once would all compute it
        references(base, out, device)
    table = tabulate(out, variants)
    sample_sheet(base, out, variants)
    return table


def run_variant(config, overrides, v: Variant, out: Path, tag: str, device=None, progress: bool = True) -> dict:
    """Train (resuming a partial run) and evaluate one variant, unless its result exists."""
    from vis2ir.checkpoint import find_checkpoint, list_checkpoints
    from vis2ir.evaluate.run import evaluate_checkpoint
    from vis2ir.io.runtime import default_device
    from vis2ir.pipeline import Vis2IRPipeline
    from vis2ir.train import train

    folder = out / "variants" / v.name
    if (folder / RESULT_FILE).exists():
        log.info("%s %s: done already, skipped", tag, v.name)
        return load_result(folder / RESULT_FILE)
    if (folder / TRAINED_FILE).exists():  # trained; its evaluation did not finish
        train_seconds = load_result(folder / TRAINED_FILE)["train_seconds"]
    else:
        cfg = load_config(config, [*overrides, *v.overrides, f"train.output_dir={folder / 'run'}"])
        started = time.perf_counter()
        partial = list_checkpoints(folder / "run") if (folder / "run").exists() else []
        if not partial or int(partial[-1].name[5:]) < cfg.train.max_steps:  # else trained; its record was not
            train(cfg, resume="latest" if partial else None, progress=progress)
        train_seconds = round(time.perf_counter() - started, 1)
        write_json(folder / TRAINED_FILE, {"train_seconds": train_seconds})
    started = time.perf_counter()
    checkpoint = find_checkpoint(folder / "run")
    scoring = [o for o in (*overrides, *v.overrides) if o.startswith("eval.")]  # also for runs trained before
    pipe = Vis2IRPipeline.from_checkpoint(checkpoint, default_device(device), overrides=scoring)
    ev = evaluate_checkpoint(checkpoint, split="test", out=folder / "eval", pipe=pipe)
    scale = None
    if pipe.model.adapter is not None:
        attention_pictures(pipe, folder / "attention")
        scale = float(np.mean(np.abs(pipe.model.adapter.scales())))  # |scale| over layers, from `scale_init`
    result = {"name": v.name, "group": v.group, "seed": v.seed, "overrides": v.overrides,
              "metrics": ev["metrics"], "classes": ev["classes"], "skipped": ev["skipped"], "images": ev["images"],
              "noise_draws": ev["draws"],
              "train_seconds": train_seconds, "eval_seconds": round(time.perf_counter() - started, 1),
              "adapter_scale": scale}
    write_json(folder / RESULT_FILE, result)
    log.info("%s %s: PSNR %.2f dB, SSIM %.3f, %s (train %.0f s, eval %.0f s)", tag, v.name, result["metrics"]["psnr"],
             result["metrics"]["ssim"], _class_line(result["classes"]), result["train_seconds"], result["eval_seconds"])
    return result


def attention_pictures(pipe, out: Path, scenes: int = 2) -> None:
    """Heat-maps of where a cross-attention model's adapter looks (`vis2ir visualize`'s pictures) on the
    first test scenes: from a person pixel (the one nearest the people's centroid) when the scene has
    one, else from the image centre."""
    from vis2ir.palette import CLASS_IDS
    from vis2ir.evaluate.baselines import sample_classes
    from vis2ir.evaluate.run import load_split
    from vis2ir.visualize import as_rgb8, save_attention_maps

    samples = load_split(pipe.cfg, "test", scenes, needs_semantic=True)
    result = pipe([s["visible"] for s in samples], [s["semantic"] for s in samples], return_attention=True,
                  batch_size=len(samples))
    for s, att in zip(samples, result.attention):
        classes = sample_classes(s)
        h, w = s["visible"].shape[-2:]
        person = (classes == CLASS_IDS["person"]).nonzero().float() if classes is not None else torch.empty(0, 2)
        if len(person):  # the person pixel nearest their centroid (the centroid of two people is between them)
            y, x = person[(person - person.mean(0)).norm(dim=1).argmin()].tolist()
        else:
            y, x = h / 2, w / 2
        rgb = {k: as_rgb8(s[k].permute(1, 2, 0).numpy()) for k in ("visible", "semantic")}
        save_attention_maps(safe_join(out, s["name"]), rgb["visible"], att, [(x, y)], rgb["semantic"])


def _class_line(classes: dict) -> str:
    return ", ".join(f"{c} {classes[c]['abs_err']:.3f}" for c in LOOKALIKE_CLASSES if c in classes) or "no look-alikes"


def load_result(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise Vis2IRError(f"{path}: unreadable result ({err}); delete it to rerun the variant") from None


def references(cfg: Config, out: Path, device=None) -> dict:
    """The reference predictors fitted on the base config's training split and scored on its test split
    (computed once, cached in `references.json`). Both splits are streamed: no sample is kept."""
    from vis2ir.evaluate.baselines import fit_references, sample_classes
    from vis2ir.evaluate.run import iter_split
    from vis2ir.evaluate.scoring import Scorer, load_networks
    from vis2ir.io.runtime import default_device

    path = out / "references.json"
    if path.exists():
        return load_result(path)
    fitted = fit_references(iter_split(cfg, "train", cfg.eval.fit_limit, needs_semantic=True))
    device = default_device(device)
    networks = load_networks(cfg.eval, device)  # once for the three predictors
    scorers = {name: Scorer(cfg.eval, device, networks) for name in fitted}
    for s in iter_split(cfg, "test", cfg.eval.limit, needs_semantic=True):
        classes = sample_classes(s)
        for name, predictor in fitted.items():
            scorers[name].add(s["name"], predictor.predict(s), s["infrared"], classes)
    rows = {}
    for name, scorer in scorers.items():
        r = scorer.result()
        rows[name] = {"metrics": r["metrics"], "classes": r["classes"]}
    write_json(path, rows)
    return rows


# ----------------------------------------------------------------------------------------------
# The table


def row_values(result: dict) -> dict[str, float]:
    """The table's numbers of one result: summary metrics, the look-alike classes' errors, the trained
    adapter's scale (cross-attention only) and the training time in minutes (start-up included)."""
    values = {k: result["metrics"].get(k) for k in METRICS}
    for c in LOOKALIKE_CLASSES:
        values[f"abs_err/{c}"] = result["classes"].get(c, {}).get("abs_err")
        values[f"hallucinated/{c}"] = result["classes"].get(c, {}).get("hallucinated_heat")
    values["adapter_scale"] = result.get("adapter_scale")
    seconds = result.get("train_seconds")
    values["train_minutes"] = None if seconds is None else seconds / 60
    return {k: (float("nan") if v is None else float(v)) for k, v in values.items()}


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN with one value), ignoring NaNs."""
    finite = np.array([v for v in values if math.isfinite(v)])
    if not len(finite):
        return float("nan"), float("nan")
    return float(finite.mean()), float(finite.std(ddof=1)) if len(finite) > 1 else float("nan")


def tabulate(out: Path, variants: list[Variant]) -> Path:
    """results.md / .csv / .png from the finished variants and the references; returns results.md."""
    groups: dict[str, list[dict]] = {}
    missing, draws = [], set()
    for v in variants:
        path = out / "variants" / v.name / RESULT_FILE
        if path.exists():
            result = load_result(path)
            groups.setdefault(v.group, []).append(row_values(result))
            draws.add(result.get("noise_draws", 1))
        else:
            missing.append(v.name)
    rows = [(g, len(vals), {k: mean_spread([r[k] for r in vals]) for k in vals[0]}) for g, vals in groups.items()]
    rows += references_rows(out)
    columns = list(rows[0][2]) if rows else []
    write_text(out / "results.csv", csv_text([_csv_row(*row) for row in rows],
                                             ["row", "seeds", *[f"{k}{s}" for k in columns for s in ("", "_std")]]))
    shown = [k for k in columns if not k.startswith("hallucinated/")]
    table = markdown_table(["row", "seeds", *shown], [[g, str(n), *[_pm(*stats[k]) for k in shown]]
                                                     for g, n, stats in rows])
    notes = f"\n{len(missing)} of {len(variants)} variants not finished yet, e.g. {missing[0]}\n" if missing else ""
    if len(draws) > 1:  # e.g. eval.noise_draws changed between runs: the rows are not comparable
        notes += f"\nWarning: the variants were scored with different eval.noise_draws ({sorted(draws)}).\n"
        log.warning("%s: variants scored with different eval.noise_draws %s; delete their result.json files "
                    "to score them again alike", out, sorted(draws))
    path = write_text(out / "results.md", "# Ablation results\n\nMean ± sample standard deviation over seeds; "
                      "PSNR/SSIM under the ThermalGen protocol, `abs_err/<class>`: mean absolute infrared error on "
                      "the class's pixels; `adapter_scale`: the trained adapter's |scale| (mean over layers); "
                      f"`train_minutes`: each run's training, start-up included.\n\n{table}{notes}")
    if rows:
        _plot(out / "results.png", rows)
    log.info("Results (%d rows, %d variants missing): %s", len(rows), len(missing), path)
    return path


def sample_sheet(cfg: Config, out: Path, variants: list[Variant], scenes: int = 6) -> Path | None:
    """`samples.png`: one row each for the first test scenes' visible, semantic and truth images, then
    one per table row with its first finished seed's predictions of them."""
    from vis2ir.evaluate.run import load_split
    from vis2ir.figures import save_figure
    from vis2ir.io.images import read_image, to_tensor
    from vis2ir.visualize import labelled_grid

    folders = {}
    for v in variants:
        pred = out / "variants" / v.name / "eval" / "pred"
        if v.group not in folders and (out / "variants" / v.name / RESULT_FILE).exists():
            folders[v.group] = pred
    if not folders:
        return None
    samples = load_split(cfg, "test", min(scenes, cfg.eval.limit or scenes), needs_semantic=True)  # those evaluated
    # lists, not stacks: with aspect-ratio buckets (data.resize_policy: bucket) the scenes differ in shape
    sheet = {"visible": [s["visible"] for s in samples], "semantic": [s["semantic"] for s in samples],
             "truth": [s["infrared"] for s in samples]}
    for group, folder in folders.items():
        paths = [safe_join(folder, s["name"], ".png") for s in samples]
        if all(p.exists() for p in paths):
            sheet[group] = [to_tensor(read_image(p), str(p)) for p in paths]
    title = (f"Ablation samples: the first {len(samples)} test scenes, then each row's first finished seed's "
             "predictions")
    fig = labelled_grid(sheet, rows=scenes, cell=128, transpose=True, title=title,
                        scene_names=[s["name"] for s in samples])
    return save_figure(out / "samples.png", fig)


def _csv_row(group: str, seeds: int, stats: dict[str, tuple[float, float]]) -> dict:
    row = {"row": group, "seeds": seeds}
    for key, (mean, spread) in stats.items():
        row[key], row[f"{key}_std"] = mean, spread
    return row


def references_rows(out: Path) -> list[tuple[str, int, dict]]:
    path = out / "references.json"
    if not path.exists():
        return []
    refs = load_result(path)
    return [(f"ref: {name}", 0, {k: (v, float("nan")) for k, v in row_values(refs[name]).items()})
            for name in REFERENCES if name in refs]


def _pm(mean: float, spread: float) -> str:
    return f"{mean:.4g} ± {spread:.2g}" if math.isfinite(mean) and math.isfinite(spread) else fmt(mean)


def _plot(path: Path, rows) -> None:
    from vis2ir.evaluate.plots import Chart, bar_charts
    from vis2ir.figures import save_figure

    names = [g for g, _, _ in rows]
    psnr = Chart("PSNR (ThermalGen protocol): mean ± sd over seeds", names,
                 {"PSNR": [s["psnr"][0] for _, _, s in rows]}, {"PSNR": [s["psnr"][1] for _, _, s in rows]},
                 axis="PSNR (dB), higher is better")
    classes = Chart("Mean absolute infrared error on the look-alike classes: mean ± sd over seeds", names,
                    {c: [s[f"abs_err/{c}"][0] for _, _, s in rows] for c in LOOKALIKE_CLASSES},
                    {c: [s[f"abs_err/{c}"][1] for _, _, s in rows] for c in LOOKALIKE_CLASSES},
                    axis="mean absolute error (infrared in 0–1), lower is better")
    save_figure(path, bar_charts([psnr, classes]))
