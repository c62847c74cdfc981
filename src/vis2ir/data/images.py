"""Panels: open an image, decode only what is needed, fix its mode, crop and resize, make a tensor.

A panel is (part of) an image file: a whole visible or infrared file, or one third of a triptych.
Files are opened, turned upright (EXIF orientation) and normalised by the package's one reader
(`vis2ir.io.images`), so panels agree with what `generate` and `evaluate` read. Decoding is where the
time goes, so JPEGs are decoded at a reduced scale (`draft`) when the panel is much larger than the
output, and resizing uses PIL's integer `reduce` first (`reducing_gap`). Grey, RGBA, palette and
16-bit inputs are handled: visible becomes RGB, infrared one grey channel (replicated to 3), semantic
maps keep their exact colours (nearest-neighbour resizing). Infrared exported through a colour
palette and semantic maps that are not palette colours are refused (`DataError`), as no conversion
can recover what they lost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from vis2ir.data.errors import DataError
from vis2ir.palette import semantic_problem
from vis2ir.io import images as io
from vis2ir.io.images import HIGH_BIT_MODES, IMAGE_SUFFIXES, Normaliser, rgb_tensor  # noqa: F401 (re-exported)

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of an image
FULL: Box = (0.0, 0.0, 1.0, 1.0)
PANEL_KINDS = ("visible", "infrared", "semantic")
COLOUR_SPREAD = 40  # a pixel whose channels differ by more than this (of 255) is coloured
COLOUR_MAPPED = 0.25  # infrared with this fraction of coloured pixels went through a colour palette


@dataclass
class Panel:
    """One panel's source: an opened, not yet decoded image, the part of it that is the panel
    (`view`, fractions of the upright image) and a label for messages (the file, or table row and column)."""

    image: Image.Image
    label: str
    view: Box = FULL

    def __post_init__(self) -> None:
        self.full_size = io.oriented_size(self.image)  # upright, before any draft() shrinks it

    @property
    def size(self) -> tuple[int, int]:
        """The panel's width and height in the upright image's pixels."""
        (w, h), (x0, y0, x1, y1) = self.full_size, self.view
        return round(w * (x1 - x0)), round(h * (y1 - y0))


def open_image(src: str | Path | BinaryIO, label: str) -> Image.Image:
    """Open an image lazily (header only); an unreadable or too large file is a `DataError` naming `label`."""
    try:
        return io.open_image(src, label)
    except io.ImageError as err:
        raise DataError(str(err)) from None


def load_upright(panel: Panel) -> Image.Image:
    """Decode a panel's image and turn it upright (EXIF), as its `view` and `size` count; undecodable
    data is a `DataError` naming the panel."""
    try:
        return io.load_image(panel.image, panel.label)
    except io.ImageError as err:
        raise DataError(str(err)) from None


def triptych_panels(image: Image.Image, label: str) -> dict[str, Panel]:
    """Split a `[visible | infrared | semantic]` image into three panels (width must divide by 3)."""
    w, h = io.oriented_size(image)
    if w % 3:
        raise DataError(f"{label}: triptych width {w} is not divisible by 3 (size {w}x{h})")
    return {kind: Panel(image, label, (k / 3, 0.0, (k + 1) / 3, 1.0)) for k, kind in enumerate(PANEL_KINDS)}


def close_panels(panels: dict[str, Panel]) -> None:
    """Close the files behind panels (a triptych's three panels share one)."""
    for panel in panels.values():
        panel.image.close()


def check_panels(panels: dict[str, Panel]) -> None:
    """What file headers tell: visible and infrared must have the same (upright) size, a semantic
    map the same aspect ratio and colour channels (a one-channel map holds class ids, not colours)."""
    vis, ir, sem = panels["visible"], panels["infrared"], panels.get("semantic")
    if vis.size != ir.size:
        raise DataError(f"{ir.label}: size mismatch: infrared is {io.wxh(ir.size)} but visible "
                        f"{vis.label} is {io.wxh(vis.size)}")
    if sem is not None and not io.same_aspect(sem.size, vis.size):
        raise DataError(f"{sem.label}: size mismatch: semantic map is {io.wxh(sem.size)}, not the aspect "
                        f"ratio of visible {vis.label} ({io.wxh(vis.size)})")
    if sem is not None and sem.image.mode in io.ONE_CHANNEL_MODES and sem.view == FULL:
        raise DataError(f"{sem.label}: {semantic_problem(None, sem.image.mode)}")


def crop_box(size: tuple[int, int], policy: str, random: bool, aspect: float = 1.0) -> Box:
    """The part of a panel of `size` (width, height) to keep, as fractions: all of it (`resize`), or the
    largest part of `aspect` (width/height; a square for the square policies), centred (`center_crop`,
    `bucket`) or at a random place (`random_crop` with `random`)."""
    if policy == "resize":
        return FULL
    w, h = size
    fw, fh = min(1.0, h * aspect / w), min(1.0, w / aspect / h)
    ox, oy = torch.rand(2).tolist() if policy == "random_crop" and random else (0.5, 0.5)
    return ox * (1 - fw), oy * (1 - fh), ox * (1 - fw) + fw, oy * (1 - fh) + fh


def decode_panel(panel: Panel, kind: str, box: Box, size: int | tuple[int, int], normaliser: Normaliser,
                 flip: bool = False) -> torch.Tensor:
    """Decode `box` of a panel to a float tensor `[3, height, width]` in [0, 1] (`size`: a square's side, or
    (width, height)), mirrored if `flip`.

    Raises `DataError` naming the panel for undecodable data, colour-mapped infrared and semantic
    maps that are not palette colours."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    image = panel.image
    vx0, vy0, vx1, vy1 = panel.view
    x0, x1 = vx0 + box[0] * (vx1 - vx0), vx0 + box[2] * (vx1 - vx0)
    y0, y1 = vy0 + box[1] * (vy1 - vy0), vy0 + box[3] * (vy1 - vy0)
    if image.format == "JPEG" and kind != "semantic":
        wanted = io.draft_size(image, math.ceil(size[0] / (x1 - x0)), math.ceil(size[1] / (y1 - y0)))
        image.draft("L" if kind == "infrared" else "RGB", wanted)
    load_upright(panel)
    w, h = image.size
    pixels = (x0 * w, y0 * h, x1 * w, y1 * h)
    if kind == "semantic":
        if image.mode in io.ONE_CHANNEL_MODES:
            raise DataError(f"{panel.label}: {semantic_problem(None, image.mode)}")
        out = io.rgb_image(image).resize(size, Image.Resampling.NEAREST, box=pixels)
        problem = semantic_problem(np.asarray(out)[::2, ::2])
        if problem:
            raise DataError(f"{panel.label}: {problem}")
    elif image.mode in HIGH_BIT_MODES:
        grey = Image.fromarray(normaliser.for_image(image)(np.asarray(image)))  # float32 -> mode F
        out = grey.resize(size, Image.Resampling.BICUBIC, box=pixels, reducing_gap=2.0)
    else:
        if kind == "infrared" and image.mode != "L":
            _check_not_colour_mapped(image, pixels, panel.label)
            image = image.convert("L")
        image = io.rgb_image(image) if kind == "visible" else image
        out = image.resize(size, Image.Resampling.BICUBIC, box=pixels, reducing_gap=2.0)
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out
    if out.mode == "F":
        return torch.from_numpy(np.repeat(np.clip(np.asarray(out), 0, 1)[None], 3, axis=0))
    return rgb_tensor(np.asarray(out))


def colour_fraction(rgb: np.ndarray) -> float:
    """The fraction of pixels of uint8 `[H, W, 3]` whose channels differ by more than `COLOUR_SPREAD`."""
    rgb = rgb.astype(np.int16)
    return float(((rgb.max(-1) - rgb.min(-1)) > COLOUR_SPREAD).mean())


def _check_not_colour_mapped(image: Image.Image, pixels: tuple, label: str) -> None:
    """Infrared in colour (an ironbow or rainbow export) cannot be turned back into brightness."""
    probe = io.rgb_image(image.resize((32, 32), Image.Resampling.NEAREST, box=pixels))
    share = colour_fraction(np.asarray(probe))
    if share >= COLOUR_MAPPED:
        raise DataError(f"{label}: the infrared image is in colour ({share:.0%} of its pixels), as exported "
                        "through a colour palette (ironbow, rainbow); its brightness does not keep the heat "
                        "order: export the raw or grey-scale infrared instead")


def loader_description(cfg, split: str) -> str:
    """In words, what the data loader makes of each sample of `split` under `cfg` (a `DataConfig`): the
    crop, the resize and the infrared normalisation (for contact sheets and evaluation reports)."""
    size = f"{cfg.size}×{cfg.size}"
    if cfg.source == "thermalscenes":
        return f"ThermalScenes rendered at {size} (synthetic, seed {cfg.synth_seed}): no crop or resize"
    if cfg.resize_policy == "bucket":
        geometry = (f"each panel resized to the nearest of the aspect-ratio buckets of about {size} pixels (sides "
                    f"multiples of 16, long/short ≤ {cfg.max_aspect:g}; the small excess of the other aspect cropped "
                    "at the centre)")
    elif cfg.resize_policy == "resize":
        geometry = f"each panel resized to {size} (aspect ratio not kept)"
    elif cfg.resize_policy == "random_crop" and split == "train":
        geometry = f"a square of the panel's shorter side at a random place, resized to {size}"
    else:
        geometry = f"the centred square of the panel's shorter side, resized to {size}"
    if cfg.hflip and split == "train":
        geometry += ", mirrored at random"
    return (f"{geometry} (bicubic; semantic maps nearest); infrared {normalisation_description(cfg)}; 16-bit PNGs "
            "vis2ir wrote (marked full-range) ÷ 65535")


def normalisation_description(cfg) -> str:
    """In words, how infrared values become 0–1 under `cfg` (a `DataConfig`; `vis2ir.io.images.Normaliser`)."""
    how = {"percentile": f"percentiles {cfg.ir_percentiles[0]:g}–{cfg.ir_percentiles[1]:g} of each image",
           "minmax": "each image's minimum–maximum",
           "fixed": f"the fixed range {cfg.ir_range[0]:g}–{cfg.ir_range[1]:g}"}[cfg.ir_normalize]
    return f"8-bit ÷ 255, 16-bit and float mapped to 0–1 by {how} (data.ir_normalize={cfg.ir_normalize})"
