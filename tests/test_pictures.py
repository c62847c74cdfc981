"""Every picture the package writes: a title, labels that are not cut and do not overlap, a colour bar
or legend where colours carry meaning, and text drawn with its spaces (issue 15, item 8)."""

import json

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.text import Text
from PIL import Image, ImageDraw

from vis2ir.data import ThermalScenes, class_id, colourise
from vis2ir.data.inspect import contact_sheet
from vis2ir.figures import figure_array, image_grid, palette_legend, save_figure
from vis2ir.visualize import AttentionMaps, compare_figure, error_strip, labelled_grid, save_attention_maps
import vis2ir.visualize as visualize


def texts(fig) -> list[str]:
    """Every non-empty text of a figure (titles, labels, legend entries, colour-bar labels)."""
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def word_gaps(image: np.ndarray) -> int:
    """Blank runs of at least 5 pixel columns (wider than any gap between the letters of a 9-point word)
    between the first and last inked column of one line of dark text on white, uint8 RGB."""
    ink = (image.min(-1) < 128).any(0)
    cols = np.flatnonzero(ink)
    runs, run = 0, 0
    for blank in ~ink[cols[0]:cols[-1] + 1]:
        run = run + 1 if blank else 0
        runs += run == 5
    return runs


def test_text_keeps_its_spaces():
    """The cause of "nosemantic map": Pillow's default font draws a space 2 pixels wide, no wider than the
    gaps between letters. matplotlib's text has word gaps wider than any gap inside a word."""
    for text in ("no semantic map", "Per-class error"):
        fig = Figure(figsize=(3, 0.4))
        fig.text(0.02, 0.3, text, fontsize=9)
        assert word_gaps(figure_array(fig)) == text.count(" "), text
        old = Image.new("RGB", (300, 30), "white")
        ImageDraw.Draw(old).text((2, 2), text, fill="black")  # Pillow's default font: words run together
        assert word_gaps(np.asarray(old)) < text.count(" ")


def scene_arrays(n=2, size=48):
    scenes = ThermalScenes(n, size, seed=1)
    rgb = lambda t: (t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return [{k: rgb(scenes[i][k]) for k in ("visible", "semantic", "infrared")} | {"name": scenes[i]["name"]}
            for i in range(n)]


def test_compare_labels_its_panels_and_the_semantic_classes():
    s = scene_arrays(1)[0]
    fig = compare_figure({"visible": s["visible"], "semantic": s["semantic"], "generated infrared (white-hot)":
                          s["infrared"][..., 0], "truth": s["infrared"][..., 0]}, "scene: visible → infrared")
    found = texts(fig)
    assert {"visible", "semantic", "generated infrared (white-hot)", "truth", "scene: visible → infrared"} <= set(found)
    present = {int(c) for c in np.unique(visualize.decode(s["semantic"])[0]) if c >= 0}
    legend = [t for t in found if t.split(" ", 1)[0].isdigit()]
    assert {int(t.split(" ", 1)[0]) for t in legend} == present  # one legend entry per class in the map


def test_demo_grid_captions_do_not_overlap():
    """Column captions wider than a tile (each prediction's scores) get room: no two overlap."""
    t = torch.rand(3, 3, 32, 32)
    columns = {"visible": t, "truth": t, "shipped": t, "visible_lookup": t}
    captions = {"shipped": "PSNR 21.43 dB · SSIM 0.727 · person 0.049 · statue 0.080",
                "visible_lookup": "PSNR 18.61 dB · SSIM 0.538 · person 0.175 · statue 0.091"}
    fig = labelled_grid(columns, rows=2, cell=64, title="demo", captions=captions)
    fig.canvas.draw()
    titles = sorted((ax.title.get_window_extent() for ax in fig.axes if ax.get_title()), key=lambda b: b.x0)
    assert len(titles) == 4
    assert all(a.x1 <= b.x0 for a, b in zip(titles, titles[1:]))
    assert "shipped\n" + captions["shipped"] in texts(fig)


def test_attention_pictures_have_colour_bars_and_labelled_heads(tmp_path, monkeypatch):
    figures = {}

    def keep(path, fig):
        figures[path.name] = fig
        return save_figure(path, fig)

    monkeypatch.setattr(visualize, "save_figure", keep)
    s = scene_arrays(1, 32)[0]
    rows, cols, layers = 4, 8, 2
    weights = torch.softmax(torch.randn(layers, 3, rows * cols, rows * cols), -1)
    att = AttentionMaps(weights, rows, cols, (32, 32))
    save_attention_maps(tmp_path, s["visible"], att, [(5, 20)], s["semantic"])
    assert set(figures) == {"point0.png", "point0_heads.png", "classes.png"}
    for name in figures:
        assert "attention" in " ".join(texts(figures[name]))
    # the colour bar's label (wrapped onto lines as long as the bar)
    assert "attention weight per semantic token" in [t.replace("\n", " ") for t in texts(figures["point0.png"])]
    heads = texts(figures["point0_heads.png"])
    assert {f"head {k}" for k in range(3)} <= set(heads)
    assert {f"layer {k}" for k in range(layers)} <= set(heads)
    assert "attention share ÷ area share" in " ".join(texts(figures["classes.png"])).replace("\n", " ")
    assert any(t.endswith(" person") for t in texts(figures["classes.png"]))  # the palette legend
    assert Image.open(tmp_path / "point0_heads.png").size[0] > 3 * 160


def bar_label_fits(fig) -> bool:
    """Whether the colour bar's label of `fig` (its last axes) is no longer than the bar, once laid out."""
    figure_array(fig)
    bar = fig.axes[-1]
    label = bar.yaxis.label.get_window_extent()
    return label.height <= bar.get_window_extent().height + 1


def test_classes_picture_shows_photo_map_and_attention_side_by_side(tmp_path, monkeypatch):
    """classes.png: the visible photo, the semantic map and the received attention ÷ area are three panels, none
    blended into another: the photo's pixels are the photo's, and the ratio panel holds only the colour bar's
    colour of each region's ratio and the outline colour (no photo under it)."""
    figures = {}
    monkeypatch.setattr(visualize, "save_figure", lambda path, fig: figures.setdefault(path.name, fig) and path)
    s = scene_arrays(1, 32)[0]
    rows, cols = 4, 8
    weights = torch.softmax(torch.randn(1, 2, rows * cols, rows * cols) * 3, -1)
    att = AttentionMaps(weights, rows, cols, (32, 32))
    save_attention_maps(tmp_path, s["visible"], att, [(5, 20)], s["semantic"])
    fig = figures["classes.png"]
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title().split("\n")[0] for ax in panels] == ["visible photo", "semantic map",
                                                                 "received attention ÷ area"]
    assert np.array_equal(np.asarray(panels[0].images[0].get_array()), s["visible"])
    assert np.array_equal(np.asarray(panels[1].images[0].get_array()), s["semantic"])
    shown = np.asarray(panels[2].images[0].get_array())
    classes = visualize.decode(s["semantic"])[0]
    stats = json.loads((tmp_path / "classes.json").read_text())
    k = shown.shape[0] // classes.shape[0]
    big = classes.repeat(k, 0).repeat(k, 1)
    top = max(2.0, max(v["ratio"] for v in stats.values()))
    bar = visualize.ironbow_bar("", top)
    outline = (shown == visualize.OUTLINE).all(-1)
    assert outline.any() and not outline.all()
    for c, v in visualize.class_attention(visualize.received_attention(att), classes).items():
        inside = (big == c) & ~outline
        assert (shown[inside] == bar.colour(np.array([v["ratio"]]))[0]).all(), c
    assert any("highest:" in t for t in texts(fig))  # the title names the classes that draw the most
    assert bar_label_fits(fig)


def test_heads_wrap_onto_rows_and_colour_bar_labels_fit():
    """Per-head attention: 8 heads of one layer wrap onto 2 rows of 4, each tile labelled with its head, so
    the picture is near square; a colour bar's label longer than a short figure's bar is wrapped to fit."""
    s = scene_arrays(1, 32)[0]
    maps = torch.softmax(torch.randn(1, 8, 16), -1).view(1, 8, 4, 4)
    fig = visualize.heads_figure(s["visible"], maps, (5, 20), "attention weight per semantic token")
    tiles = [ax for ax in fig.axes if ax.images]
    assert len(tiles) == 8 and [ax.get_title() for ax in tiles] == [f"head {k}" for k in range(8)]
    assert len({round(ax.get_position().y0, 3) for ax in tiles}) == 2  # two rows
    width, height = figure_array(fig).shape[1::-1]
    assert width < 3 * height
    assert bar_label_fits(fig)
    strip = image_grid([[s["visible"]] * 3], title="one short row", cell=96,
                       colour_bar=visualize.ColourBar("attention weight per semantic token", 0, 1))
    assert bar_label_fits(strip) and "\n" in strip.axes[-1].yaxis.label.get_text()


def test_contact_sheet_labels_columns_rows_and_the_loaders_processing():
    samples = [{k: torch.from_numpy(v).permute(2, 0, 1) / 255 for k, v in s.items() if k != "name"}
               | {"name": s["name"], "split": "train"} for s in scene_arrays(2)]
    del samples[1]["semantic"]
    fig = contact_sheet(samples, "data/x", "the centred square of the panel's shorter side, resized to 48×48")
    found = texts(fig)
    assert {"visible", "infrared", "semantic", "no semantic map"} <= set(found)
    assert f"{samples[0]['name']}\n[train]" in found
    assert any("resized to 48×48" in t and "data/x" in t for t in found)


def test_error_strip_and_palette_legend(tmp_path):
    truth = np.zeros((16, 16), np.float32)
    pred = truth.copy()
    pred[4:8, 4:8] = 0.5
    fig = error_strip([("a", pred, truth), ("b", truth, truth)], "scored")
    found = texts(fig)
    assert {"prediction", "truth", "absolute error", "a", "b", "|prediction − truth| (infrared, 0–1)"} <= set(found)
    error = fig.axes[2].images[0].get_array()  # a's error, coloured: bright where the prediction is off
    assert np.asarray(error)[5, 5].sum() > np.asarray(error)[0, 0].sum() + 200
    classes = np.full((8, 8), class_id("road"))
    classes[2:5, 2:5] = class_id("person")
    legend = texts(palette_legend(colourise(classes), title="map"))
    assert any(t.endswith("person") for t in legend) and any(t.endswith("road") for t in legend)
    assert not any(t.endswith(" car") for t in legend)  # only the map's classes (and void)
    path = save_figure(tmp_path / "legend.png", palette_legend())
    assert Image.open(path).size[1] > 40 * 16 and not list(tmp_path.glob(".*"))  # every class; no temporary files


def test_images_of_other_shapes_keep_their_aspect_in_a_grid():
    """Aspect-ratio buckets: a portrait image in a grid of landscape tiles is fitted inside its tile, not
    stretched to the first image's shape (measured on the figure: the image's drawn width / height)."""
    wide, tall = torch.rand(3, 48, 80), torch.rand(3, 80, 48)
    fig = labelled_grid({"visible": [wide, tall], "prediction": [wide, tall]}, rows=2)
    figure_array(fig)  # lays the figure out

    def drawn_aspect(ax):
        left, right, bottom, top = ax.images[0].get_extent()
        (x0, y0), (x1, y1) = ax.transData.transform([(left, top), (right, bottom)])
        return abs(x1 - x0) / abs(y1 - y0)

    shown = sorted(drawn_aspect(ax) for ax in fig.axes if ax.images)
    assert len(shown) == 4
    assert np.allclose(shown, [48 / 80] * 2 + [80 / 48] * 2, rtol=0.02), shown
    marked = image_grid([[np.zeros((48, 80), np.float32), np.zeros((80, 48), np.float32)]], title="t",
                        markers=[[None, (23.5, 39.5)]])  # the centre of the portrait image, in its pixels
    figure_array(marked)
    ax = marked.axes[1]
    left, right, bottom, top = ax.images[0].get_extent()
    centre = ax.transData.transform([((left + right) / 2, (top + bottom) / 2)])[0]
    mark = ax.transData.transform([(ax.lines[0].get_xdata()[0], ax.lines[0].get_ydata()[0])])[0]
    assert np.allclose(mark, centre, atol=0.5), (mark, centre)
