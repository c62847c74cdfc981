"""Pictures of results: infrared palettes, labelled comparisons and grids, adapter-attention heat-maps.

Functions on numpy images (uint8 `[H, W, 3]` RGB, or float `[H, W]` in [0, 1]) and on
`AttentionMaps`, the adapter's attention for one image as the pipeline returns it. Every picture has
a title, labelled panels, a colour bar where colours are values and the semantic palette's legend
where a semantic map is shown (`vis2ir.figures`, matplotlib); files are written atomically.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from vis2ir.errors import Vis2IRError
from vis2ir.figures import ColourBar, image_grid, lut_colormap, save_figure, semantic_ids
from vis2ir.files import write_text
from vis2ir.palette import decode

log = logging.getLogger(__name__)

MIN_PICTURE_SIDE = 256  # pictures of smaller images are drawn larger (pixels not smoothed)
HEAD_CELL = 160  # per-head attention tiles
HEADS_PER_ROW = 4  # per-head tiles wrap onto rows of this many: a picture near square, readable when shrunk
OUTLINE = (0, 255, 255)  # class-region outlines over ironbow colours (which hold no cyan)
PALETTES = ("white-hot", "black-hot", "ironbow")
# Ironbow: black → indigo → magenta → red → orange → yellow → white, by control points.
IRONBOW_POINTS = ((0.00, (0, 0, 10)), (0.15, (30, 0, 100)), (0.35, (140, 10, 150)), (0.55, (220, 60, 60)),
                  (0.72, (250, 140, 10)), (0.88, (255, 215, 40)), (1.00, (255, 255, 245)))


# ----------------------------------------------------------------------------------------------
# Infrared output


def ironbow_lut() -> np.ndarray:
    """The ironbow palette as a uint8 look-up table `[256, 3]`."""
    x = np.linspace(0, 1, 256)
    stops = np.array([p for p, _ in IRONBOW_POINTS])
    colours = np.array([c for _, c in IRONBOW_POINTS], dtype=np.float64)
    return np.stack([np.interp(x, stops, colours[:, k]) for k in range(3)], -1).round().astype(np.uint8)


def check_output_format(bit_depth: int, palette: str) -> None:
    """Fail early on an impossible pair: colour palettes are 8-bit RGB."""
    if palette not in PALETTES:
        raise Vis2IRError(f"--palette: {palette!r} is not one of {', '.join(PALETTES)}")
    if bit_depth not in (8, 16):
        raise Vis2IRError(f"--bit-depth: expected 8 or 16, got {bit_depth}")
    if bit_depth == 16 and palette == "ironbow":
        raise Vis2IRError("--bit-depth 16 works with the grey palettes (white-hot, black-hot); ironbow is 8-bit RGB")


def infrared_image(grey: np.ndarray, bit_depth: int = 8, palette: str = "white-hot") -> np.ndarray:
    """Float infrared `[H, W]` in [0, 1] → the array to save: uint8 / uint16 grey, or uint8 RGB (ironbow)."""
    check_output_format(bit_depth, palette)
    top = 255 if bit_depth == 8 else 65535
    level = np.round(np.clip(grey, 0, 1) * top).astype(np.uint8 if bit_depth == 8 else np.uint16)
    if palette == "ironbow":
        return ironbow_lut()[level]
    return top - level if palette == "black-hot" else level


def as_rgb8(image: np.ndarray) -> np.ndarray:
    """Any image array (uint8/uint16/float, grey or RGB) → uint8 RGB `[H, W, 3]`."""
    if image.dtype == np.uint16:
        image = image / 65535.0
    if image.dtype != np.uint8:
        image = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    return np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3]


def compare_figure(panels: dict[str, np.ndarray], title: str) -> Figure:
    """Named images of one scene side by side, each labelled (`visible`, `semantic`, `generated`,
    `truth`, ...), with the semantic palette's legend of the classes in a `semantic` panel."""
    semantic = panels.get("semantic")
    cell = max(MIN_PICTURE_SIDE, max(next(iter(panels.values())).shape[:2]))
    return image_grid([[as_rgb8(p) for p in panels.values()]], title=title, column_labels=list(panels),
                      cell=min(cell, 512), legend_ids=semantic_ids([as_rgb8(semantic)]) if semantic is not None else ())


# ----------------------------------------------------------------------------------------------
# Attention maps


@dataclass
class AttentionMaps:
    """The adapter's attention for one image, averaged over the denoising steps.

    `weights [layers, heads, N, M]`: queries are the canvas tokens `[visible | infrared]`, keys the
    semantic tokens `[semantic | semantic]`, both on the token grid `rows × cols` (row-major).
    `size` is the input image's `(height, width)`.
    """

    weights: torch.Tensor
    rows: int
    cols: int
    size: tuple[int, int]
    panels: int = 2
    target_panel: int = 1

    @property
    def panel_cols(self) -> int:
        return self.cols // self.panels


def query_index(att: AttentionMaps, x: float, y: float) -> int:
    """The target-panel token under input pixel `(x, y)`."""
    h, w = att.size
    if not (0 <= x < w and 0 <= y < h):
        raise Vis2IRError(f"--point {x:g},{y:g}: outside the {w}×{h} image")
    r = min(int(y / h * att.rows), att.rows - 1)
    c = min(int(x / w * att.panel_cols), att.panel_cols - 1)
    return r * att.cols + att.target_panel * att.panel_cols + c


def fold_keys(weights: torch.Tensor, att: AttentionMaps) -> torch.Tensor:
    """`[..., M]` attention over the semantic canvas → `[..., rows, panel_cols]` over the image (copies summed)."""
    grid = weights.unflatten(-1, (att.rows, att.panels, att.panel_cols))
    return grid.sum(-2)


def query_attention(att: AttentionMaps, x: float, y: float) -> torch.Tensor:
    """Where the query at input pixel `(x, y)` looks: `[layers, heads, rows, panel_cols]`, each summing to 1."""
    return fold_keys(att.weights[:, :, query_index(att, x, y)].float(), att)


def received_attention(att: AttentionMaps) -> torch.Tensor:
    """Attention each semantic location receives from the target panel's queries, averaged over
    layers, heads and queries: `[rows, panel_cols]`, summing to 1."""
    q = torch.arange(att.rows * att.cols).view(att.rows, att.cols)
    targets = q[:, att.target_panel * att.panel_cols:(att.target_panel + 1) * att.panel_cols].reshape(-1)
    return fold_keys(att.weights[:, :, targets].float().mean(dim=(0, 1, 2)), att)


def class_attention(received: torch.Tensor, classes: np.ndarray) -> dict[int, dict[str, float]]:
    """Per class id: the attention `mass` its region receives, its `area` fraction, and `ratio` = mass / area
    (above 1: the region gets more than its share). `received [rows, cols]`, `classes [H, W]`."""
    density = upsample(received / received.sum(), classes.shape, mode="nearest")
    density = density / density.sum()
    stats = {}
    for c in np.unique(classes):
        region = classes == c
        mass, area = float(density[region].sum()), float(region.mean())
        stats[int(c)] = {"mass": mass, "area": area, "ratio": mass / area}
    return stats


def upsample(grid: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """A token map `[rows, cols]` → a float array `[H, W]` at the image size."""
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(grid[None, None].float(), size=size, mode=mode, **kwargs)[0, 0].numpy()


def overlay(visible: np.ndarray, heat: np.ndarray, top: float | None = None, alpha: float = 0.8) -> np.ndarray:
    """Heat `[H, W]` over the visible image in ironbow colours, opaque where hot: uint8 RGB.
    `top` is the heat shown at full strength (default: the map's maximum)."""
    top = float(heat.max()) if top is None else top
    level = np.clip(heat / top if top > 0 else heat, 0, 1)
    colours = ironbow_lut()[np.round(level * 255).astype(np.uint8)].astype(np.float64)
    weight = alpha * level[..., None]
    return np.round((1 - weight) * as_rgb8(visible) + weight * colours).astype(np.uint8)


def ironbow_bar(label: str, top: float) -> ColourBar:
    return ColourBar(label, 0.0, top, lut_colormap(ironbow_lut(), "ironbow"))


def save_attention_maps(directory: str | Path, visible: np.ndarray, att: AttentionMaps,
                        points: list[tuple[float, float]], semantic: np.ndarray | None = None) -> list[Path]:
    """Write the heat-maps for one image into `directory` (drawn at least `MIN_PICTURE_SIDE` pixels
    high or wide), each with a title and a colour bar of the attention weights:

    - `point{i}.png`: where the query at each point (the cross) looks, mean over layers and heads,
      over the visible image;
    - `point{i}_heads.png`: the same per layer and head on one colour scale, each tile labelled with its
      head, a layer's heads wrapped onto rows of `HEADS_PER_ROW`;
    - `classes.png` / `classes.json`: the attention each semantic class region receives, as its share of
      the attention over its share of the area (`class_attention`), in colour with the class regions
      outlined, beside the visible photo and the semantic map with its legend, none blended into another
      (needs `semantic`).
    """
    directory = Path(directory)
    h, w = att.size
    cell = max(MIN_PICTURE_SIDE, h, w)
    shown = as_rgb8(visible)
    written = []
    label = "attention weight per semantic token"
    for i, (x, y) in enumerate(points):
        maps = query_attention(att, x, y)
        mean = maps.mean(dim=(0, 1))
        top = float(mean.max())
        fig = image_grid([[overlay(shown, upsample(mean, (h, w)), top)]], cell=cell, markers=[[(x, y)]],
                         title=f"Where the query at x={x:.1f}, y={y:.1f} (+) looks\n(mean over "
                               f"{_count(maps.shape[0], 'layer')} × {_count(maps.shape[1], 'head')}; "
                               f"{att.rows}×{att.panel_cols} tokens)",
                         colour_bar=ironbow_bar(label, top))
        written.append(save_figure(directory / f"point{i}.png", fig))
        fig = heads_figure(shown, maps, (x, y), label)
        written.append(save_figure(directory / f"point{i}_heads.png", fig))
    if semantic is not None:
        from vis2ir.palette import CLASS_NAMES

        semantic = as_rgb8(semantic)
        classes = decode(semantic)[0]
        stats = class_attention(received_attention(att), classes)
        named = {(CLASS_NAMES[c] if 0 <= c < len(CLASS_NAMES) else "void"): s
                 for c, s in sorted(stats.items(), key=lambda kv: -kv[1]["ratio"])}
        written.append(save_figure(directory / "classes.png", classes_figure(shown, semantic, classes, stats, named,
                                                                            cell)))
        written.append(write_text(directory / "classes.json", json.dumps(named, indent=2)))
    return written


def heads_figure(visible: np.ndarray, maps: torch.Tensor, point: tuple[float, float], label: str) -> Figure:
    """Where the query at `point` (input pixels) looks, per layer and head: `maps [layers, heads, rows, cols]`
    over the visible image (uint8 RGB `[H, W, 3]`) on one colour scale, each tile labelled with its head; a
    layer's heads wrap onto rows of `HEADS_PER_ROW`, so the picture stays near square."""
    h, w = visible.shape[:2]
    layers, heads = maps.shape[:2]
    top = float(maps.max())
    tiles, labels, rows = [], [], []
    for layer in range(layers):
        for start in range(0, heads, HEADS_PER_ROW):
            shown = range(start, min(heads, start + HEADS_PER_ROW))
            tiles.append([overlay(visible, upsample(maps[layer, k], (h, w)), top) for k in shown])
            labels.append([f"head {k}" for k in shown])
            rows.append(f"layer {layer}")
    x, y = point
    return image_grid(tiles, cell=HEAD_CELL, title=f"Per layer and head: the query at x={x:.1f}, y={y:.1f} (+)",
                      tile_labels=labels, row_labels=rows, markers=[[point] * len(r) for r in tiles],
                      colour_bar=ironbow_bar(label, top))


def classes_figure(visible: np.ndarray, semantic: np.ndarray, classes: np.ndarray, stats: dict, named: dict,
                   cell: int) -> Figure:
    """`classes.png`: the visible photo, the semantic map (uint8 RGB `[H, W, 3]`, its legend below) and each
    class region's received attention ÷ area (`class_attention`'s `stats` by class id; `named`: by class
    name, highest first) side by side: the ratio drawn alone in ironbow colours, the class regions
    (`classes [H, W]`) outlined, so neither the photo nor the colours hide the other."""
    ratio = np.zeros(classes.shape, np.float32)
    for c, s in stats.items():
        ratio[classes == c] = s["ratio"]
    top = max(2.0, float(ratio.max()))  # ratio 1 (a fair share) at mid-scale or below
    bar = ironbow_bar("attention share ÷ area share", top)
    most = ", ".join(f"{name} {s['ratio']:.2f}" for name, s in list(named.items())[:3])
    return image_grid([[visible, semantic, outlined(bar.colour(ratio), classes, cell)]], cell=cell,
                      title=f"Attention each class region receives, over its share of the area\n(highest: {most})",
                      column_labels=["visible photo", "semantic map",
                                     "received attention ÷ area\n(1: a fair share; outlines: class regions)"],
                      colour_bar=bar, legend_ids=semantic_ids([semantic]))


def outlined(image: np.ndarray, classes: np.ndarray, cell: int) -> np.ndarray:
    """`image` (uint8 RGB `[H, W, 3]`) enlarged by whole pixels to about `cell` on its longer side, with the
    borders between the regions of `classes [H, W]` drawn one pixel wide in `OUTLINE` colour."""
    k = max(1, round(cell / max(classes.shape)))
    big = image.repeat(k, 0).repeat(k, 1).copy()
    ids = classes.repeat(k, 0).repeat(k, 1)
    edge = np.zeros(ids.shape, bool)
    edge[:-1] |= ids[:-1] != ids[1:]
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    big[edge] = OUTLINE
    return big


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("s" if n != 1 else "")


def labelled_grid(columns: dict[str, torch.Tensor], rows: int = 8, cell: int = 96, transpose: bool = False,
                  title: str = "", captions: dict[str, str] | None = None, scene_names: list[str] | None = None
                  ) -> Figure:
    """A labelled picture of named sets of images `[B, 3, H, W]` (or lists of `[3, H, W]` of several sizes:
    aspect-ratio buckets; tiles take the first image's shape, others fit inside at their own aspect) in [0, 1]: one set per column with its
    name (and `captions[name]`, e.g. its scores) on top and one scene per row (named by `scene_names`),
    or with `transpose` one set per row, its name on the left. A `semantic` set adds the palette's legend
    of the classes shown.

    Sets other than `visible` and `semantic` are infrared: shown grey (the channel mean).
    """
    first = next(iter(columns.values()))
    n = min(rows, len(first))
    tiles = {}
    for name, images in columns.items():
        images = [image.float().cpu().clamp(0, 1) for image in images[:n]]
        if name not in ("visible", "semantic"):
            images = [image.mean(0, keepdim=True).expand(3, -1, -1) for image in images]
        tiles[name] = [(image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8) for image in images]
    labels = [name + (f"\n{captions[name]}" if captions and captions.get(name) else "") for name in columns]
    names = (scene_names or [])[:n] or None
    legend = semantic_ids(tiles["semantic"]) if "semantic" in tiles else ()
    if transpose:
        return image_grid([tiles[name] for name in columns], title=title, row_labels=labels, column_labels=names,
                          cell=cell, legend_ids=legend)
    return image_grid([[tiles[name][r] for name in columns] for r in range(n)], title=title, column_labels=labels,
                      row_labels=names, cell=cell, legend_ids=legend)


def error_strip(examples: list[tuple[str, np.ndarray, np.ndarray]], title: str) -> Figure:
    """One row per `(name, prediction, truth)` (grey float `[H, W]` in [0, 1], same size): prediction |
    truth | absolute error, the error in colour on one scale for all rows, with its colour bar."""
    top = max(0.05, max(float(np.abs(p - t).max()) for _, p, t in examples))
    bar = ColourBar("|prediction − truth| (infrared, 0–1)", 0.0, top, "magma")
    rows = [[as_rgb8(p), as_rgb8(t), bar.colour(np.abs(p - t))] for _, p, t in examples]
    cell = min(256, max(128, *examples[0][1].shape))
    return image_grid(rows, title=title, column_labels=["prediction", "truth", "absolute error"],
                      row_labels=[name for name, _, _ in examples], cell=cell, colour_bar=bar)
