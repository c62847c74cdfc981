import math

import numpy as np
from PIL import Image, ImageDraw

from vis2ir.evaluate.plots import COLOURS, LEFT, PLOT_WIDTH, TOP, bar_chart, nice_max


def test_nice_max_rounds_up_to_1_2_5():
    assert [nice_max(v) for v in (0.7, 1.3, 3.1, 7.0, 23.7)] == [1.0, 2.0, 5.0, 10.0, 50.0]
    assert nice_max(float("nan")) == 1.0 and nice_max(0.0) == 1.0


def test_long_labels_widen_the_chart_instead_of_being_cut():
    """Ablation rows have long names that differ only at the end: the label column fits the longest."""
    long = "mode=cross_attention__position=rope__inject_into=condition__adapter_learning_rate=0.003"
    short = bar_chart("t", ["a", "b"], {"PSNR": [1.0, 2.0]})
    wide = bar_chart("t", ["a", long], {"PSNR": [1.0, 2.0]})
    assert short.shape[1] == LEFT + PLOT_WIDTH
    text = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(long))
    left = text + 16
    assert wide.shape[1] == left + PLOT_WIDTH
    row = TOP + 22 + 8 + 11  # the middle of the second category's bar
    blue = np.all(wide[row] == COLOURS[0], axis=-1).nonzero()[0]
    assert blue.min() == left + 1  # the bar starts after the label (and the axis line at `left`)...
    dark = (wide[TOP + 22 + 8:TOP + 2 * 22 + 8, :left] < 128).all(-1).any(0).nonzero()[0]
    assert dark.max() > text - 12  # ...whose last characters are drawn


def test_bars_scale_with_values_and_skip_nan():
    chart = bar_chart("t", ["a", "b", "c"], {"v": [1.0, 2.0, math.nan]})
    lengths = [np.all(chart[TOP + i * 30 + 11] == COLOURS[0], axis=-1).sum() for i in range(3)]
    assert lengths[2] == 0 and abs(lengths[1] - 2 * lengths[0]) <= 2
