import math

import numpy as np
from matplotlib.container import BarContainer
from matplotlib.text import Text

from vis2ir.evaluate.plots import Chart, bar_chart, bar_charts
from vis2ir.figures import DPI, figure_array, text_width


def test_long_labels_widen_the_chart_instead_of_being_cut():
    """Ablation rows have long names that differ only at the end: the saved chart grows to hold the longest."""
    long = "mode=cross_attention__position=rope__inject_into=condition__adapter_learning_rate=0.003"
    short = figure_array(bar_chart("t", ["a", "b"], {"PSNR": [1.0, 2.0]}))
    wide_fig = bar_chart("t", ["a", long], {"PSNR": [1.0, 2.0]})
    wide = figure_array(wide_fig)
    assert wide.shape[1] >= short.shape[1] + text_width(long) * DPI - 40
    labels = [t.get_text() for t in wide_fig.axes[0].get_yticklabels()]
    assert labels == ["a", long]


def test_bars_scale_with_values_skip_nan_and_show_values_and_errors():
    fig = bar_chart("title", ["a", "b", "c"], {"v": [1.0, 2.0, math.nan]}, {"v": [0.1, 0.2, math.nan]}, axis="dB")
    ax = fig.axes[0]
    widths = [p.get_width() for p in ax.patches]
    assert widths == [1.0, 2.0]  # NaN left out
    texts = [t.get_text() for t in fig.findobj(Text)]
    assert {"1", "2", "title", "dB"} <= set(texts) and "nan" not in texts
    bars = next(c for c in ax.containers if isinstance(c, BarContainer))
    assert len(bars.errorbar.lines[2][0].get_segments()) == 2  # ± whiskers on both bars


def test_several_series_get_a_legend_and_charts_stack():
    charts = [Chart("PSNR", ["x", "y"], {"PSNR": [20.0, 21.0]}),
              Chart("errors", ["x", "y"], {"person": [0.1, 0.2], "statue": [0.3, np.nan]})]
    fig = bar_charts(charts)
    assert len(fig.axes) == 2
    assert fig.axes[0].get_legend() is None
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ["person", "statue"]
