"""Pictures of results: infrared palettes, side-by-side comparisons, adapter-attention heat-maps.

Pure functions on numpy images (uint8 `[H, W, 3]` RGB, or float `[H, W]` in [0, 1]) and on
`AttentionMaps`, the adapter's attention for one image as the pipeline returns it. Files are
written atomically (`vis2ir.io.images.write_png`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from vis2ir.errors import Vis2IRError
from vis2ir.files import write_text
from vis2ir.io.images import write_png

log = logging.getLogger(__name__)

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


def side_by_side(panels: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Images of one height side by side on white, as uint8 RGB."""
    panels = [as_rgb8(p) for p in panels]
    h = max(p.shape[0] for p in panels)
    out = np.full((h, sum(p.shape[1] for p in panels) + gap * (len(panels) - 1), 3), 255, np.uint8)
    x = 0
    for p in panels:
        out[:p.shape[0], x:x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


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


def mark(image: np.ndarray, x: float, y: float) -> np.ndarray:
    """A small cross at `(x, y)`, white with a black outline."""
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    r = max(3, min(image.shape[:2]) // 40)
    for colour, width in (((0, 0, 0), 3), ((255, 255, 255), 1)):
        draw.line([(x - r, y), (x + r, y)], fill=colour, width=width)
        draw.line([(x, y - r), (x, y + r)], fill=colour, width=width)
    return np.asarray(pil)


def tile_grid(tiles: list[list[np.ndarray]], max_side: int = 192, gap: int = 2) -> np.ndarray:
    """Rows of equally sized images → one image, each tile shrunk to at most `max_side` pixels."""
    h, w = tiles[0][0].shape[:2]
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    rows = [side_by_side([np.asarray(Image.fromarray(t).resize(size, Image.BILINEAR)) for t in row], gap)
            for row in tiles]
    out = np.full((sum(r.shape[0] for r in rows) + gap * (len(rows) - 1), rows[0].shape[1], 3), 255, np.uint8)
    y = 0
    for r in rows:
        out[y:y + r.shape[0]] = r
        y += r.shape[0] + gap
    return out


MIN_PICTURE_SIDE = 256  # attention pictures of smaller images are enlarged to at least this


def enlarge(image: np.ndarray, zoom: int) -> np.ndarray:
    """Each pixel of `[H, W, ...]` repeated `zoom` × `zoom` times (nearest neighbour)."""
    return image if zoom == 1 else image.repeat(zoom, axis=0).repeat(zoom, axis=1)


def save_attention_maps(directory: str | Path, visible: np.ndarray, att: AttentionMaps,
                        points: list[tuple[float, float]], semantic: np.ndarray | None = None) -> list[Path]:
    """Write the heat-maps for one image into `directory` (at least `MIN_PICTURE_SIDE` pixels high or wide):

    - `point{i}.png`: where the query at each point looks (mean over layers and heads), over the visible image;
    - `point{i}_heads.png`: the same per layer (rows) and head (columns);
    - `classes.png` / `classes.json`: the attention each semantic class region receives, as its share of
      the attention over its share of the area (needs `semantic`).
    """
    directory = Path(directory)
    zoom = max(1, -(-MIN_PICTURE_SIDE // max(att.size)))  # small images are drawn larger (pixels repeated)
    size = (att.size[0] * zoom, att.size[1] * zoom)
    shown_visible = enlarge(as_rgb8(visible), zoom)
    written = []
    for i, (x, y) in enumerate(points):
        maps = query_attention(att, x, y)
        mx, my = (x + 0.5) * zoom - 0.5, (y + 0.5) * zoom - 0.5
        mean = overlay(shown_visible, upsample(maps.mean(dim=(0, 1)), size))
        written.append(write_png(directory / f"point{i}.png", mark(mean, mx, my)))
        tiles = [[mark(overlay(shown_visible, upsample(maps[layer, head], size)), mx, my)
                  for head in range(maps.shape[1])] for layer in range(maps.shape[0])]
        written.append(write_png(directory / f"point{i}_heads.png", tile_grid(tiles)))
    if semantic is not None:
        from vis2ir.palette import CLASS_NAMES, decode

        classes = decode(as_rgb8(semantic))[0]
        stats = class_attention(received_attention(att), classes)
        ratio = np.zeros(classes.shape, np.float32)
        for c, s in stats.items():
            ratio[classes == c] = s["ratio"]
        # ratio 1 (a fair share) at mid-scale
        shown = overlay(shown_visible, enlarge(ratio, zoom), top=max(2.0, float(ratio.max())))
        pair = side_by_side([enlarge(as_rgb8(semantic), zoom), shown])
        written.append(write_png(directory / "classes.png", pair))
        named = {(CLASS_NAMES[c] if 0 <= c < len(CLASS_NAMES) else "void"): s
                 for c, s in sorted(stats.items(), key=lambda kv: -kv[1]["ratio"])}
        written.append(write_text(directory / "classes.json", json.dumps(named, indent=2)))
    return written


def labelled_grid(columns: dict[str, torch.Tensor], rows: int = 8, cell: int = 96, transpose: bool = False) -> np.ndarray:
    """A picture of named sets of images `[B, 3, H, W]` in [0, 1]: one set per column with its name
    on top and one scene per row, or with `transpose` one set per row, its name on the left.

    Sets other than `visible` and `semantic` are infrared: shown grey (the channel mean).
    """
    first = next(iter(columns.values()))
    n = min(rows, first.shape[0])
    h, w = first.shape[-2:]
    scale = max(1, cell // max(h, w))
    ch, cw, gap = h * scale, w * scale, 2
    if transpose:  # names on the left, as wide as the longest needs
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        top, left = 0, math.ceil(max(measure.textlength(name) for name in columns)) + 8
    else:
        top, left = 14, 0
    sets, scenes = (len(columns), n) if transpose else (n, len(columns))  # grid rows, grid columns
    sheet = Image.new("RGB", (left + scenes * (cw + gap), top + sets * (ch + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (name, images) in enumerate(columns.items()):
        label = name if transpose else _fit(draw, name, cw - 2)
        draw.text((2, c * (ch + gap) + ch // 2 - 5) if transpose else (c * (cw + gap) + 2, 1), label, fill="black")
        for r in range(n):
            image = images[r].float().cpu()
            image = image if name in ("visible", "semantic") else image.mean(0, keepdim=True).expand(3, -1, -1)
            tile = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
            col, row = (r, c) if transpose else (c, r)
            sheet.paste(Image.fromarray(tile).resize((cw, ch), Image.NEAREST), (left + col * (cw + gap), top + row * (ch + gap)))
    return np.asarray(sheet)


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """`text`, cut short with '…' to fit `width` pixels."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "…") > width:
        text = text[:-1]
    return text + "…"
