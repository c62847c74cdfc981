"""Bar charts with matplotlib: horizontal grouped bars with values, optional ± error bars, a legend of
the series, several charts stacked in one figure. Saved with `vis2ir.figures.save_figure` (atomic)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure

from vis2ir.figures import DPI, FONT_SIZE, text_width

ROW_INCHES = 0.22  # per bar


@dataclass
class Chart:
    """One chart: one group of bars per category, one bar per series (NaN values left out);
    `errors` draws ± whiskers for the series it names; `axis` labels the value axis."""

    title: str
    categories: list[str]
    series: dict[str, list[float]]
    errors: dict[str, list[float]] = field(default_factory=dict)
    axis: str = ""


def bar_charts(charts: list[Chart], plot_width: float = 6.0) -> Figure:
    """The charts one above the other, each with its title, category labels (never cut: the figure is
    as wide as the longest label needs beside `plot_width` inches of bars), the value at each bar's end
    and, with several series, a legend."""
    heights = [max(1.0, ROW_INCHES * len(c.categories) * max(1, len(c.series)) + 0.3) for c in charts]
    labels = max(text_width(name) for c in charts for name in c.categories)
    fig = Figure(figsize=(plot_width + labels + 0.3, sum(heights) + 0.9 * len(charts)), dpi=DPI,
                 layout="constrained")
    axes = fig.subplots(len(charts), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, chart in zip(axes, charts):
        _draw(ax, chart)
    return fig


def bar_chart(title: str, categories: list[str], series: dict[str, list[float]],
              errors: dict[str, list[float]] | None = None, axis: str = "") -> Figure:
    """One chart (`Chart`) as a figure."""
    return bar_charts([Chart(title, categories, series, errors or {}, axis)])


def _draw(ax, chart: Chart) -> None:
    n = max(1, len(chart.series))
    height = 0.8 / n
    y = np.arange(len(chart.categories))
    for k, (name, values) in enumerate(chart.series.items()):
        values = np.asarray(values, dtype=np.float64)
        errors = np.asarray(chart.errors.get(name, [math.nan] * len(values)), dtype=np.float64)
        keep = np.isfinite(values)
        pos = y[keep] - 0.4 + height * (k + 0.5)
        err = np.where(np.isfinite(errors[keep]), errors[keep], 0.0) if name in chart.errors else None
        bars = ax.barh(pos, values[keep], height * 0.9, xerr=err, label=name, capsize=2,
                       error_kw={"elinewidth": 0.8})
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values[keep]], padding=3, fontsize=FONT_SIZE - 1)
    ax.set_yticks(y, chart.categories, fontsize=FONT_SIZE)
    ax.invert_yaxis()  # the first category on top
    ax.set_title(chart.title, fontsize=FONT_SIZE + 1, loc="left", fontweight="bold")
    ax.set_xlabel(chart.axis, fontsize=FONT_SIZE)
    ax.tick_params(axis="x", labelsize=FONT_SIZE - 1)
    ax.margins(x=0.12)
    ax.set_xlim(left=0)
    ax.grid(axis="x", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    if len(chart.series) > 1:
        ax.legend(fontsize=FONT_SIZE - 1, loc="best", frameon=False)
