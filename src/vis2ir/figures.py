"""Labelled pictures with matplotlib: grids of images with a title, column and row labels, captions,
a colour bar and the semantic palette's legend; saved atomically.

Every picture the package writes goes through here (bar charts: `vis2ir.evaluate.plots`), so text is
set by matplotlib's fonts (DejaVu Sans, spaces kept; Pillow's 10-pixel default font ran words together)
and labels are never cut: figures are saved with a tight bounding box that grows to hold every label.
Figures are built without pyplot (`matplotlib.figure.Figure`, Agg canvas): no global backend, no
display needed, nothing kept between pictures.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.colors import Colormap, ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from PIL import Image

from vis2ir.files import atomic_write
from vis2ir.io.inputs import printable

DPI = 100
FONT_SIZE = 9
PAD_INCHES = 0.08
SAVE_OPTIONS = dict(dpi=DPI, bbox_inches="tight", pad_inches=PAD_INCHES, facecolor="white")  # one look for files and arrays


def save_figure(path: str | Path, fig: Figure) -> Path:
    """Save `fig` atomically (format from the suffix: `.png`, `.jpg`, ...) with every label inside."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **SAVE_OPTIONS))


def figure_array(fig: Figure) -> np.ndarray:
    """`fig` rendered as `save_figure` writes it: uint8 RGB `[H, W, 3]` (e.g. for TensorBoard)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **SAVE_OPTIONS)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def lut_colormap(lut: np.ndarray, name: str) -> Colormap:
    """A uint8 look-up table `[256, 3]` as a matplotlib colour map."""
    return ListedColormap(lut.astype(np.float64) / 255.0, name=name)


@dataclass
class ColourBar:
    """What the colours of a picture's heat mean: `label`, the value range and the colour map."""

    label: str
    vmin: float
    vmax: float
    cmap: Colormap | str = "magma"

    def colour(self, values: np.ndarray) -> np.ndarray:
        """Values `[H, W]` in this bar's colours: uint8 RGB `[H, W, 3]`."""
        from matplotlib import colormaps

        cmap = colormaps[self.cmap] if isinstance(self.cmap, str) else self.cmap
        rgba = cmap(Normalize(self.vmin, self.vmax, clip=True)(values))
        return np.round(rgba[..., :3] * 255).astype(np.uint8)


def image_grid(cells: list[list[np.ndarray | None]], *, title: str, column_labels: list[str] | None = None,
               row_labels: list[str] | None = None, cell: int = 128, colour_bar: ColourBar | None = None,
               legend_ids=(), markers: list[list[tuple[float, float] | None]] | None = None,
               missing: str = "none", tile_labels: list[list[str | None]] | None = None) -> Figure:
    """Rows of images in one figure, each shown `cell` pixels on its longer side (pixels not smoothed).

    `cells[r][c]`: uint8 RGB `[H, W, 3]`, grey `[H, W]` (uint8, or float in [0, 1]), or None (a grey
    tile saying `missing`). `column_labels` go over the top row (may have several lines: captions),
    `row_labels` left of the first column; `tile_labels[r][c]` over every tile instead (a grid wrapped onto
    several rows: rows are spaced to hold them). `colour_bar` adds a bar saying what heat colours mean (its
    label wrapped to the bar's length, so a short figure does not cut it);
    `legend_ids`, palette class ids, add the semantic palette's legend of those classes on the right;
    `markers[r][c]`: an `(x, y)` in image pixels drawn as a cross. Tiles take the first image's shape; an
    image of another shape is fitted inside its tile at its own aspect (on a dark ground), never stretched.
    Names from file names that are not UTF-8 are shown with their odd bytes escaped (`io.inputs.printable`).
    """
    title = printable(title)
    column_labels = [printable(t) for t in column_labels] if column_labels is not None else None
    row_labels = [printable(t) for t in row_labels] if row_labels is not None else None
    if tile_labels is not None:
        tile_labels = [[printable(t) if t else None for t in row] for row in tile_labels]
        column_labels = None
    rows, cols = len(cells), max(len(r) for r in cells)
    shown = [c for r in cells for c in r if c is not None]
    h, w = shown[0].shape[:2] if shown else (cell, cell)
    scale = cell / max(h, w)
    tile_w, tile_h, gap = w * scale / DPI, h * scale / DPI, 0.06
    tops = column_labels or [t for row in tile_labels or [] for t in row if t]
    widest = max((text_width(line) for label in tops for line in label.split("\n")), default=0)
    wgap = max(gap, widest + 0.1 - tile_w)  # room for the widest column label: labels never overlap
    lines = max((label.count("\n") + 1 for label in tops), default=0)
    hgap = gap + (lines * FONT_SIZE * 1.3 + 4) / 72 if tile_labels is not None else gap  # room for tile labels
    fig = Figure(figsize=(cols * tile_w + (cols - 1) * wgap, rows * tile_h + (rows - 1) * hgap), dpi=DPI)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1, wspace=wgap / tile_w, hspace=hgap / tile_h)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            image = cells[r][c] if c < len(cells[r]) else None
            if image is None:
                ax.set_facecolor((0.3, 0.3, 0.3))
                ax.text(0.5, 0.5, missing, ha="center", va="center", color="white", fontsize=FONT_SIZE,
                        transform=ax.transAxes)
                ax.set_xlim(0, w)
                ax.set_ylim(h, 0)
                continue
            grey = image.ndim == 2
            ih, iw = image.shape[:2]
            # An image of another shape than the tile's (aspect-ratio buckets) is fitted inside it, not stretched.
            s = min(w / iw, h / ih) if (ih, iw) != (h, w) else 1.0
            x0, y0 = (w - iw * s) / 2 - 0.5, (h - ih * s) / 2 - 0.5
            extent = None if (ih, iw) == (h, w) else (x0, x0 + iw * s, y0 + ih * s, y0)
            ax.imshow(image, cmap="gray" if grey else None, vmin=0, vmax=1 if image.dtype.kind == "f" else 255,
                      interpolation="nearest", aspect="auto", extent=extent)
            if extent is not None:
                ax.set_facecolor((0.15, 0.15, 0.15))
                ax.set_xlim(-0.5, w - 0.5)
                ax.set_ylim(h - 0.5, -0.5)
            if markers and markers[r][c] is not None:
                x, y = markers[r][c]
                if extent is not None:
                    x, y = x0 + (x + 0.5) * s, y0 + (y + 0.5) * s
                for colour, size, width in (("black", 12, 3.0), ("white", 10, 1.2)):
                    ax.plot([x], [y], marker="+", color=colour, markersize=size, markeredgewidth=width)
    for c, label in enumerate(column_labels or []):
        axes[0][c].set_title(label, fontsize=FONT_SIZE, pad=3)
    for r, row in enumerate(tile_labels or []):
        for c, label in enumerate(row):
            if label:
                axes[r][c].set_title(label, fontsize=FONT_SIZE, pad=3)
    for r, label in enumerate(row_labels or []):
        axes[r][0].set_ylabel(label, fontsize=FONT_SIZE, rotation=0, ha="right", va="center", labelpad=4)
    fig.suptitle(title, fontsize=FONT_SIZE + 2, fontweight="bold", x=0, ha="left", va="bottom",
                 y=1 + (lines * FONT_SIZE * 1.3 + 6) / 72 / fig.get_figheight())
    if colour_bar is not None:
        mappable = _mappable(colour_bar)
        bar = fig.colorbar(mappable, ax=axes.ravel().tolist(), fraction=0.05 / max(1, cols) ** 0.5, pad=0.02,
                           aspect=max(8, 12 * rows))
        # The bar is as long as the figure is high: a longer label is wrapped onto lines that fit it.
        bar.set_label(wrap_text(colour_bar.label, 0.9 * fig.get_figheight()), fontsize=FONT_SIZE)
        bar.ax.tick_params(labelsize=FONT_SIZE - 1)
    if len(legend_ids):
        add_palette_legend(fig, legend_ids, below=colour_bar is not None)
    return fig


def text_width(text: str, size: float = FONT_SIZE) -> float:
    """The width in inches of one line of `text` at `size` points, as the Agg renderer sets it."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    renderer = RendererAgg(1, 1, DPI)
    return renderer.get_text_width_height_descent(text, FontProperties(size=size), ismath=False)[0] / DPI


def wrap_text(text: str, inches: float, size: float = FONT_SIZE) -> str:
    """`text` broken between words into lines at most `inches` wide at `size` points (a word wider than
    that stays whole on its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and text_width(f"{lines[-1]} {word}", size) <= inches:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return "\n".join(lines)


def _mappable(bar: ColourBar):
    from matplotlib.cm import ScalarMappable

    return ScalarMappable(Normalize(bar.vmin, bar.vmax), bar.cmap)


def semantic_ids(maps) -> list[int]:
    """The palette classes (not void) found in semantic maps (uint8 RGB `[H, W, 3]` each)."""
    from vis2ir.palette import VOID, decode

    found = set()
    for m in maps:
        found.update(int(c) for c in np.unique(decode(m)[0]))
    return sorted(found - {VOID})


def add_palette_legend(fig: Figure, ids, title: str = "semantic classes", below: bool = False) -> None:
    """The semantic palette's legend of the class ids `ids` (base colour and name), right of the figure
    (or `below` it, when a colour bar takes the right)."""
    from vis2ir.palette import legend_entries

    entries = legend_entries(ids)
    handles = [Patch(facecolor=np.array(e["rgb"]) / 255.0, edgecolor="grey", label=f"{e['id']} {e['name']}")
               for e in entries]
    if below:
        columns = max(1, int(fig.get_figwidth() / 1.9))
        where = dict(loc="upper left", bbox_to_anchor=(0.0, -0.01), alignment="left")
    else:
        columns = -(-len(handles) // 40)
        where = dict(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.legend(handles=handles, fontsize=FONT_SIZE - 1, title=title, title_fontsize=FONT_SIZE, frameon=False,
               ncols=columns, handlelength=1.2, **where)


def palette_legend(semantic: np.ndarray | None = None, ids=None, title: str = "Semantic palette") -> Figure:
    """The legend of the classes in a semantic map (uint8 RGB `[H, W, 3]`, palette colours) — or of
    `ids`, or of every class — as a figure of its own: per class its id, name and base colour, and for
    countable classes (things) the next instance shades; black is void (no class)."""
    from vis2ir.palette import VOID, colourise, legend_entries

    if semantic is not None:
        ids = semantic_ids([semantic])
    entries = [{"id": VOID, "name": "void (no class)", "thing": False}] + legend_entries(ids)
    per_column, shades, width = 40, 4, 2.8
    columns = -(-len(entries) // per_column)
    rows = min(len(entries), per_column)
    fig = Figure(figsize=(width * columns, 0.2 * rows), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.set_xlim(0, width * columns)
    ax.set_ylim(rows, 0)
    for k, e in enumerate(entries):
        x, y = width * (k // per_column), k % per_column
        for s in range(shades if e["thing"] else 1):
            colour = colourise(np.array([e["id"]]), np.array([s]))[0] / 255.0
            ax.add_patch(Rectangle((x + 0.14 * s, y + 0.12), 0.12, 0.76, facecolor=colour, edgecolor="grey",
                                   linewidth=0.5))
        ax.text(x + 0.14 * shades + 0.04, y + 0.5, f"{e['id']:>3}  {e['name']}", va="center", fontsize=FONT_SIZE)
    fig.suptitle(f"{title}: {len(entries) - 1} classes (countable ones: base colour, then the next instances' "
                 "shades)", fontsize=FONT_SIZE + 1, fontweight="bold", x=0, ha="left", va="bottom", y=1.0)
    return fig
