"""Evaluation reports: JSON, CSV, a markdown table and a per-class bar chart, each written atomically.

    metrics.json     everything (summary, skipped metrics and why, per class, per image, settings)
    per_image.csv    one row per image
    per_class.csv    one row per class of the semantic maps
    metrics.md       the summary and the per-class table, in markdown
    per_class.png    per-class mean absolute error and hallucinated-heat rate
    strip.png        prediction | truth | absolute error for the first few images, as scored

`result["scored"]` says what was scored (which files or loader, resolution, normalisation, 8-bit or
float), in `metrics.json` and at the top of `metrics.md`.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from vis2ir.evaluate.plots import bar_chart
from vis2ir.figures import save_figure
from vis2ir.files import write_json, write_text

SUMMARY_KEYS = ("psnr", "ssim", "psnr_native", "ssim_native", "lpips", "fid")
CLASS_KEYS = ("pixels", "images", "abs_err", "mean_err", "hallucinated_heat")


def csv_text(rows: list[dict], columns: list[str]) -> str:
    """Rows (dicts) as CSV text with the given columns (missing values empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def fmt(value, digits: int = 4) -> str:
    """A number for a table: `—` for missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def evaluation_markdown(result: dict) -> str:
    """The summary and per-class tables of one evaluation."""
    m = result["metrics"]
    text = [f"# Evaluation: {result['images']} images\n",
            "PSNR/SSIM: ThermalGen protocol (one channel, 256×256 bilinear, data_range 1) and at native "
            "resolution. LPIPS-alex on the 256×256 grey images; FID with the pytorch-fid Inception.\n",
            markdown_table(list(SUMMARY_KEYS), [[fmt(m.get(k)) for k in SUMMARY_KEYS]])]
    if result.get("scored"):
        text.append("What was scored:\n\n" + "".join(f"- {k}: {v}\n" for k, v in result["scored"].items()))
    if result.get("per_draw"):
        psnrs = [d["psnr"] for d in result["per_draw"]]
        text.append(f"Means over {len(psnrs)} noise draws (`eval.noise_draws`); PSNR per draw: "
                    f"{', '.join(fmt(v) for v in psnrs)}.\n")
    for name, why in result.get("skipped", {}).items():
        text.append(f"- {name} skipped: {why}\n")
    if result.get("classes"):
        text.append(f"\n## Per class (hot: above the truth image's {result['settings']['hot_percentile']:g}th "
                    "percentile)\n")
        rows = [[name] + [fmt(c[k]) for k in CLASS_KEYS] for name, c in result["classes"].items()]
        text.append(markdown_table(["class", *CLASS_KEYS], rows))
    return "\n".join(text)


def write_report(result: dict, out: str | Path, examples=()) -> Path:
    """All report files of one evaluation into `out`; returns the path of `metrics.json`. `examples`:
    `(name, prediction, truth)` grey float `[H, W]` as scored (`Scorer.examples`) for `strip.png`."""
    out = Path(out)
    per_image = result.get("per_image", [])
    columns = ["name", "draw", *[k for k in SUMMARY_KEYS if per_image and k in per_image[0]]]
    write_text(out / "per_image.csv", csv_text(per_image, columns))
    classes = [{"class": name, **c} for name, c in result.get("classes", {}).items()]
    write_text(out / "per_class.csv", csv_text(classes, ["class", *CLASS_KEYS]))
    write_text(out / "metrics.md", evaluation_markdown(result))
    if classes:
        names = [c["class"] for c in classes]
        chart = bar_chart(f"Per-class error over {result['images']} images", names,
                          {"mean absolute error": [c["abs_err"] for c in classes],
                           "hallucinated heat (share of not-hot pixels predicted hot)":
                               [c["hallucinated_heat"] for c in classes]},
                          axis="infrared error (0–1) / share of pixels (0–1)")
        save_figure(out / "per_class.png", chart)
    if examples:
        from vis2ir.visualize import error_strip

        title = (f"The first {len(examples)} of {result['images']} images as scored (native resolution): "
                 f"PSNR {fmt(result['metrics']['psnr_native'])} dB, SSIM {fmt(result['metrics']['ssim_native'])} "
                 "over all")
        save_figure(out / "strip.png", error_strip(list(examples), title))
    return write_json(out / "metrics.json", result)
