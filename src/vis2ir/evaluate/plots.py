"""Bar charts drawn with PIL (no plotting library): grouped bars, optional error bars, one value axis."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
ROW = 22       # pixels per category
BAR_GAP = 4
LEFT = 170     # least room for category labels (more when a label is longer)
TOP = 34       # room for the title and the legend
PLOT_WIDTH = 590  # bars, value labels and axis


def nice_max(value: float) -> float:
    """A round upper end for an axis starting at 0 (1, 2 or 5 × 10^k)."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    k = 10 ** math.floor(math.log10(value))
    return next(m * k for m in (1, 2, 5, 10) if m * k >= value)


def bar_chart(title: str, categories: list[str], series: dict[str, list[float]],
              errors: dict[str, list[float]] | None = None) -> np.ndarray:
    """Horizontal grouped bars, one group per category, one bar per series → uint8 RGB `[H, W, 3]`.

    Values that are NaN are left out; `errors` draws ± whiskers for the series it names.
    """
    errors = errors or {}
    n = max(1, len(series))
    height = TOP + ROW * n * len(categories) + 8 * len(categories) + 30
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = max([LEFT] + [int(measure.textlength(c)) + 16 for c in categories])  # no label is cut short
    width = left + PLOT_WIDTH
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 4), title, fill="black")
    for k, name in enumerate(series):
        x = left + 150 * k
        draw.rectangle((x, 20, x + 10, 28), fill=COLOURS[k % len(COLOURS)])
        draw.text((x + 14, 18), name, fill="black")
    finite = [v + _finite_or_zero(errors.get(s, [0.0] * len(vals))[i]) for s, vals in series.items()
              for i, v in enumerate(vals) if math.isfinite(v)]
    top = nice_max(max(finite, default=1.0))
    scale = (width - left - 70) / top
    y = TOP
    for i, category in enumerate(categories):
        draw.text((8, y + (ROW * n) // 2 - 6), category, fill="black")
        for k, (name, values) in enumerate(series.items()):
            v = values[i]
            if math.isfinite(v):
                x1 = left + max(v, 0) * scale
                draw.rectangle((left, y + BAR_GAP // 2, x1, y + ROW - BAR_GAP // 2), fill=COLOURS[k % len(COLOURS)])
                e = _finite_or_zero(errors.get(name, [0.0] * len(values))[i])
                if e:
                    lo, hi = left + max(v - e, 0) * scale, left + (v + e) * scale
                    draw.line((lo, y + ROW // 2, hi, y + ROW // 2), fill="black", width=1)
                draw.text((x1 + e * scale + 4, y + 4), f"{v:.3g}", fill="black")
            y += ROW
        y += 8
    draw.line((left, TOP, left, y), fill="black")
    draw.line((left, y, width - 70, y), fill="black")
    for tick in np.linspace(0, top, 5):
        x = left + tick * scale
        draw.line((x, y, x, y + 4), fill="black")
        draw.text((x - 8, y + 6), f"{tick:.3g}", fill="black")
    return np.asarray(image)


def _finite_or_zero(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def stack_vertically(images: list[np.ndarray], gap: int = 10) -> np.ndarray:
    """uint8 RGB images one above the other, on white."""
    width = max(im.shape[1] for im in images)
    out = np.full((sum(im.shape[0] for im in images) + gap * (len(images) - 1), width, 3), 255, np.uint8)
    y = 0
    for im in images:
        out[y:y + im.shape[0], :im.shape[1]] = im
        y += im.shape[0] + gap
    return out
