"""Panels: open an image, decode only what is needed, fix its mode, crop and resize, make a tensor.

A panel is (part of) an image file: a whole visible or infrared file, or one third of a triptych.
Decoding is where the time goes, so JPEGs are decoded at a reduced scale (`draft`) when the panel
is much larger than the output, and resizing uses PIL's integer `reduce` first (`reducing_gap`).
Grey, RGBA, palette and 16-bit inputs are handled: visible becomes RGB, infrared one grey channel
(replicated to 3), semantic maps keep their exact colours (nearest-neighbour resizing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from vis2ir.data.errors import DataError, describe

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of an image
FULL: Box = (0.0, 0.0, 1.0, 1.0)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
PANEL_KINDS = ("visible", "infrared", "semantic")


@dataclass(frozen=True)
class Normaliser:
    """Maps a high-bit (e.g. 16-bit infrared) image to [0, 1]: per image by min-max or percentiles,
    or by a fixed range of raw values."""

    method: str = "percentile"
    percentiles: tuple[float, float] = (1.0, 99.0)
    value_range: tuple[float, float] = (0.0, 65535.0)

    def __call__(self, a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float32)
        if self.method == "fixed":
            lo, hi = self.value_range
        elif self.method == "minmax":
            lo, hi = float(a.min()), float(a.max())
        else:
            lo, hi = np.percentile(a[::2, ::2], self.percentiles)
        return np.clip((a - np.float32(lo)) / np.float32(max(hi - lo, 1e-6)), 0.0, 1.0).astype(np.float32)


@dataclass
class Panel:
    """One panel's source: an opened, not yet decoded image, the part of it that is the panel
    (`view`, fractions of the image) and a label for messages (the file, or table row and column)."""

    image: Image.Image
    label: str
    view: Box = FULL

    def __post_init__(self) -> None:
        self.full_size = self.image.size  # before any draft() shrinks it

    @property
    def size(self) -> tuple[int, int]:
        """The panel's width and height in the stored image's pixels."""
        (w, h), (x0, y0, x1, y1) = self.full_size, self.view
        return round(w * (x1 - x0)), round(h * (y1 - y0))


def open_image(src: str | Path | BinaryIO, label: str) -> Image.Image:
    """Open an image lazily (header only); an unreadable file is a `DataError` naming `label`."""
    try:
        return Image.open(src)
    except Exception as err:  # PIL raises many types for bad files; all mean "cannot read"
        raise DataError(f"{label}: cannot read image ({describe(err)})") from None


def triptych_panels(image: Image.Image, label: str) -> dict[str, Panel]:
    """Split a `[visible | infrared | semantic]` image into three panels (width must divide by 3)."""
    w, h = image.size
    if w % 3:
        raise DataError(f"{label}: triptych width {w} is not divisible by 3 (size {w}x{h})")
    return {kind: Panel(image, label, (k / 3, 0.0, (k + 1) / 3, 1.0)) for k, kind in enumerate(PANEL_KINDS)}


def close_panels(panels: dict[str, Panel]) -> None:
    """Close the files behind panels (a triptych's three panels share one)."""
    for panel in panels.values():
        panel.image.close()


def check_sizes(panels: dict[str, Panel]) -> None:
    """Visible and infrared must have the same size; a semantic map the same aspect ratio."""
    vis, ir, sem = panels["visible"], panels["infrared"], panels.get("semantic")
    if vis.size != ir.size:
        raise DataError(f"{ir.label}: size mismatch: infrared is {_wxh(ir.size)} but visible "
                        f"{vis.label} is {_wxh(vis.size)}")
    if sem is not None and not _same_aspect(sem.size, vis.size):
        raise DataError(f"{sem.label}: size mismatch: semantic map is {_wxh(sem.size)}, not the aspect "
                        f"ratio of visible {vis.label} ({_wxh(vis.size)})")


def crop_box(size: tuple[int, int], policy: str, random: bool) -> Box:
    """The part of a panel to keep, as fractions: all of it (`resize`), or the largest square,
    centred (`center_crop`) or at a random place (`random_crop` with `random`)."""
    if policy == "resize":
        return FULL
    w, h = size
    side = min(w, h)
    fw, fh = side / w, side / h
    ox, oy = torch.rand(2).tolist() if policy == "random_crop" and random else (0.5, 0.5)
    return ox * (1 - fw), oy * (1 - fh), ox * (1 - fw) + fw, oy * (1 - fh) + fh


def decode_panel(panel: Panel, kind: str, box: Box, size: int, normaliser: Normaliser,
                 flip: bool = False) -> torch.Tensor:
    """Decode `box` of a panel to a float tensor `[3, size, size]` in [0, 1], mirrored if `flip`."""
    image = panel.image
    vx0, vy0, vx1, vy1 = panel.view
    x0, x1 = vx0 + box[0] * (vx1 - vx0), vx0 + box[2] * (vx1 - vx0)
    y0, y1 = vy0 + box[1] * (vy1 - vy0), vy0 + box[3] * (vy1 - vy0)
    if image.format == "JPEG" and kind != "semantic":
        image.draft("L" if kind == "infrared" else "RGB", (math.ceil(size / (x1 - x0)), math.ceil(size / (y1 - y0))))
    try:
        image.load()
    except Exception as err:  # truncated or corrupt data: PIL raises many types
        raise DataError(f"{panel.label}: cannot decode image ({describe(err)})") from None
    w, h = image.size
    pixels = (x0 * w, y0 * h, x1 * w, y1 * h)
    if kind == "semantic":
        out = _rgb(image).resize((size, size), Image.Resampling.NEAREST, box=pixels)
    elif image.mode in HIGH_BIT_MODES:
        grey = Image.fromarray(normaliser(np.asarray(image)))  # float32 -> mode F
        out = grey.resize((size, size), Image.Resampling.BICUBIC, box=pixels, reducing_gap=2.0)
    else:
        image = image.convert("L") if kind == "infrared" and image.mode != "L" else image
        image = _rgb(image) if kind == "visible" else image
        out = image.resize((size, size), Image.Resampling.BICUBIC, box=pixels, reducing_gap=2.0)
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out
    if out.mode == "F":
        return torch.from_numpy(np.repeat(np.clip(np.asarray(out), 0, 1)[None], 3, axis=0))
    return rgb_tensor(np.asarray(out))


def rgb_tensor(a: np.ndarray) -> torch.Tensor:
    """uint8 `[H, W, 3]` (or grey `[H, W]`, replicated) -> float `[3, H, W]` in [0, 1].

    Done in numpy: torch's parallel kernels stall for milliseconds when the cores are busy."""
    a = a.transpose(2, 0, 1) if a.ndim == 3 else np.broadcast_to(a, (3, *a.shape))
    out = np.ascontiguousarray(a, dtype=np.float32)
    return torch.from_numpy(np.divide(out, np.float32(255), out=out))


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def _same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return abs(a[0] * b[1] - a[1] * b[0]) <= 0.01 * a[0] * b[1]


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


