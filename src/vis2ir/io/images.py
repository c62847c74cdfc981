"""The one image reader and writer of the package: every command reads and writes images here.

- **Opening** (`open_image`) reads the header only and refuses images above the pixel limit (a
  decompression bomb, or a giant no command can use) in one line naming the file; the limit is
  Pillow's `Image.MAX_IMAGE_PIXELS` (about 89 megapixels), or `$VIS2IR_MAX_IMAGE_PIXELS` (0: none).
- **Orientation**: sizes are reported (`oriented_size`) and pixels decoded (`load_image`) upright,
  as the EXIF `Orientation` tag of phone photos says (`ImageOps.exif_transpose`).
- **Values**: 8-bit images are divided by 255; 16-bit, 32-bit and float images go through a
  `Normaliser` (the `data.ir_normalize` settings), the same one in training, generation and scoring.
- **Writing**: `write_png`, atomically; vis2ir's 16-bit infrared carries a text chunk saying its values
  are full-range [0, 1] (`is_full_range`), so that `evaluate --pred` does not take them for raw counts.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from vis2ir.errors import Vis2IRError, describe
from vis2ir.files import atomic_write

# The image files every listing takes (GIF and multi-page TIFF: their first frame). Files of the other
# formats Pillow opens (PSD, ICO, EPS, ...) are named as skipped by the listings (`other_image_suffixes`).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".gif", ".tif", ".tiff", ".webp",
                  ".avif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k", ".jpx")
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
ONE_CHANNEL_MODES = ("1", "L", "LA", "La", *HIGH_BIT_MODES)
PIXEL_LIMIT_ENV = "VIS2IR_MAX_IMAGE_PIXELS"
ORIENTATION_TAG = 0x0112
_QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


# Photo and raster formats Pillow cannot open without plug-ins (HEIC/HEIF of phones, camera raw, JPEG XL,
# OpenEXR, SVG): files of these are images the user meant, named as skipped, never left out in silence.
UNREADABLE_IMAGE_SUFFIXES = (".heic", ".heif", ".hif", ".jxl", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf",
                             ".rw2", ".raf", ".raw", ".exr", ".svg")


def other_image_suffixes() -> frozenset[str]:
    """Suffixes of image files the listings do not take (named as skipped): formats Pillow can open that are
    not `IMAGE_SUFFIXES`, and photo formats it cannot open here (`UNREADABLE_IMAGE_SUFFIXES`)."""
    opened = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return frozenset((opened | set(UNREADABLE_IMAGE_SUFFIXES)) - set(IMAGE_SUFFIXES))


class ImageError(Vis2IRError):
    """An image file that cannot be used; the message names the file."""


# ----------------------------------------------------------------------------------------------
# Opening and decoding


def pixel_limit() -> int | None:
    """The largest image (in pixels) that is opened: `$VIS2IR_MAX_IMAGE_PIXELS` (0: no limit), else
    Pillow's `Image.MAX_IMAGE_PIXELS`. Setting the variable also sets Pillow's own guard to match."""
    text = os.environ.get(PIXEL_LIMIT_ENV)
    if text is not None:
        try:
            value = int(text)
        except ValueError:
            raise Vis2IRError(f"{PIXEL_LIMIT_ENV}={text!r}: expected a number of pixels (0: no limit)") from None
        Image.MAX_IMAGE_PIXELS = value or None
    return Image.MAX_IMAGE_PIXELS


def _too_large(label: str, pixels: str, limit: int | None) -> ImageError:
    return ImageError(f"{label}: the image is too large ({pixels} pixels, the limit is {limit}: a decompression "
                      f"bomb guard); set {PIXEL_LIMIT_ENV} to a larger number of pixels (0: no limit) if you mean it")


def open_image(src: str | Path | BinaryIO, label: str | None = None) -> Image.Image:
    """Open an image lazily (header only). An unreadable file, or one above `pixel_limit()`, is an
    `ImageError` naming `label` (default: the path)."""
    label = str(src) if label is None else label
    limit = pixel_limit()
    try:
        with warnings.catch_warnings():  # the limit is checked below, as an error
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(src)
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file") from None
    except Image.DecompressionBombError as err:
        found = str(err).split("(", 1)[-1].split(" ", 1)[0]
        raise _too_large(label, found, limit) from None
    except Exception as err:  # PIL raises many types for bad files; all mean "cannot read"
        suffix = Path(src).suffix.lower() if isinstance(src, (str, Path)) else ""
        if suffix in other_image_suffixes():  # a phone's HEIC given as a file: the line a folder's listing gives
            raise ImageError(f"{label}: a {suffix} file, a format vis2ir does not read; convert it to PNG (read: "
                             f"{' '.join(IMAGE_SUFFIXES)})") from None
        raise ImageError(f"{label}: cannot read image ({describe(err)})") from None
    w, h = image.size
    if limit and w * h > limit:
        image.close()
        raise _too_large(label, f"{w}x{h} = {w * h}", limit)
    return image


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1: upright) from the header, without decoding the pixels."""
    try:
        if image.format == "PNG" and "exif" not in image.info:
            return 1  # Pillow would decode the whole PNG to look for a late eXIf chunk
        return int(image.getexif().get(ORIENTATION_TAG, 1) or 1)
    except Exception:  # a malformed EXIF block: treat the image as upright
        return 1


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """`(width, height)` of the image as shown upright (EXIF orientation applied), from the header."""
    w, h = image.size
    return (h, w) if orientation(image) in _QUARTER_TURNS else (w, h)


def draft_size(image: Image.Image, width: int, height: int) -> tuple[int, int]:
    """A wanted upright size in the stored image's orientation (for `Image.draft`, before decoding)."""
    return (height, width) if orientation(image) in _QUARTER_TURNS else (width, height)


def load_image(image: Image.Image, label: str) -> Image.Image:
    """Decode an opened image and turn it upright (in place); returns it. Truncated or corrupt data
    (or too little memory for it) is an `ImageError` naming `label`."""
    try:
        image.load()
        if orientation(image) != 1:
            ImageOps.exif_transpose(image, in_place=True)
    except Exception as err:  # truncated or corrupt data: PIL raises many types
        raise ImageError(f"{label}: cannot decode image ({describe(err)})") from None
    return image


def read_image(path: str | Path, label: str | None = None) -> Image.Image:
    """Open, decode and turn upright an image file (errors are `ImageError`s naming the file)."""
    label = str(path) if label is None else label
    with open_image(path, label) as image:
        return load_image(image, label).copy()


def rgb_image(image: Image.Image) -> Image.Image:
    """Any PIL image as RGB (transparent palette entries resolved first, alpha dropped)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether two `(width, height)` sizes have the same aspect ratio (within 1 %)."""
    return abs(a[0] * b[1] - a[1] * b[0]) <= 0.01 * a[0] * b[1]


def wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


# ----------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class Normaliser:
    """Maps a high-bit (e.g. 16-bit infrared) image to [0, 1]: per image by min-max or percentiles,
    or by a fixed range of raw values (`data.ir_normalize`, `ir_percentiles`, `ir_range`)."""

    method: str = "percentile"
    percentiles: tuple[float, float] = (1.0, 99.0)
    value_range: tuple[float, float] = (0.0, 65535.0)

    @classmethod
    def of(cls, data_cfg: Any) -> Normaliser:
        """The normaliser a `DataConfig` describes."""
        return cls(data_cfg.ir_normalize, tuple(data_cfg.ir_percentiles), tuple(data_cfg.ir_range))

    def for_image(self, image: Any) -> Normaliser:
        """The normaliser for `image`: `FULL_RANGE` when it is a 16-bit PNG that says it is vis2ir's full-range
        output (`is_full_range`: `generate --bit-depth 16` writes it so), else this one — so that an output
        read back as data or as a truth keeps its values instead of being stretched as raw sensor counts."""
        return FULL_RANGE if isinstance(image, Image.Image) and is_full_range(image) else self

    def __call__(self, a: np.ndarray) -> np.ndarray:
        """Raw values `[H, W]` -> float32 in [0, 1]."""
        a = a.astype(np.float32)
        if self.method == "fixed":
            lo, hi = self.value_range
        elif self.method == "minmax":
            lo, hi = float(a.min()), float(a.max())
        else:
            lo, hi = np.percentile(a[::2, ::2], self.percentiles)
        return np.clip((a - np.float32(lo)) / np.float32(max(hi - lo, 1e-6)), 0.0, 1.0).astype(np.float32)


FULL_RANGE = Normaliser("fixed")  # 0 .. 65535 -> 0 .. 1: the default for 16-bit images outside a data set


def rgb_tensor(a: np.ndarray) -> torch.Tensor:
    """uint8 `[H, W, 3]` (or grey `[H, W]`, replicated) -> float `[3, H, W]` in [0, 1].

    Done in numpy: torch's parallel kernels stall for milliseconds when the cores are busy."""
    a = a.transpose(2, 0, 1) if a.ndim == 3 else np.broadcast_to(a, (3, *a.shape))
    out = np.ascontiguousarray(a, dtype=np.float32)
    return torch.from_numpy(np.divide(out, np.float32(255), out=out))


def to_tensor(image: Any, what: str = "image", normaliser: Normaliser | None = None,
              honour_mark: bool = True) -> torch.Tensor:
    """A PIL image, array (`[H, W]`, `[H, W, 3|4]`; uint8, uint16 or float in [0, 1]) or tensor
    (`[3, H, W]`, `[H, W]`) → float `[3, H, W]` in [0, 1].

    16-bit and 32-bit images (and float PIL images) go through `normaliser` as the data loader's
    panels do; without one, 16-bit values are divided by 65535 and float ones are taken as [0, 1].
    A 16-bit PNG that vis2ir wrote (`is_full_range`) is read at full range whatever `normaliser` says,
    unless `honour_mark` is false (`evaluate --pred-values ir-normalize`).
    Raises `Vis2IRError` naming `what` for other types and shapes.
    """
    if isinstance(image, Image.Image):
        if honour_mark and normaliser is not None:
            normaliser = normaliser.for_image(image)
        if image.mode in HIGH_BIT_MODES:
            raw = np.asarray(image)
            image = raw.astype(np.float32) if image.mode == "F" and normaliser is None else (
                (normaliser or FULL_RANGE)(raw))
        else:
            image = np.asarray(rgb_image(image))
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8:
            t = torch.from_numpy(image.astype(np.float32) / 255.0)
        elif image.dtype in (np.uint16, np.int32, np.uint32) and image.ndim == 2:
            t = torch.from_numpy((normaliser or FULL_RANGE)(image))
        else:
            scale = 65535.0 if image.dtype == np.uint16 else 1.0
            t = torch.from_numpy(image.astype(np.float32) / scale)
        t = t[None] if t.ndim == 2 else t[..., :3].permute(2, 0, 1) if t.ndim == 3 else t
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        t = t.float() / 255 if t.dtype == torch.uint8 else t.float()
        t = t[None] if t.ndim == 2 else t
    else:
        raise Vis2IRError(f"{what}: expected a PIL image, numpy array or tensor, got {type(image).__name__}")
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise Vis2IRError(f"{what}: expected [H, W], [H, W, 3] or [3, H, W], got shape {list(t.shape)}")
    return t.expand(3, -1, -1).clamp(0, 1)


def is_finite(image: torch.Tensor | np.ndarray) -> bool:
    """Whether every value is a finite number (a broken model gives NaN / inf)."""
    if isinstance(image, np.ndarray):
        return bool(np.isfinite(image).all())
    return bool(torch.isfinite(image).all())


# ----------------------------------------------------------------------------------------------
# Writing


# The text chunk of the 16-bit infrared PNGs vis2ir writes: their values are [0, 1] over the whole
# range (0..65535), not raw sensor counts; `evaluate --pred` reads a file with it at full range.
VALUES_KEY = "vis2ir:values"
FULL_RANGE_TEXT = "full-range: 0..65535 is 0..1"


def write_png(path: str | Path, image: np.ndarray, full_range: bool = False, **options) -> Path:
    """Save a uint8 / uint16 array (`[H, W]` grey or `[H, W, 3]` RGB) as PNG, atomically; `options`
    go to Pillow (`compress_level=...`). `full_range`: the values are [0, 1] scaled to the dtype's
    range (vis2ir's infrared, not raw counts or ids); a 16-bit image then carries the `VALUES_KEY`
    text chunk saying so (`is_full_range`)."""
    info = None
    if full_range and image.dtype == np.uint16:
        info = full_range_info()
    return atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG", pnginfo=info, **options))


def full_range_info() -> PngInfo:
    """The PNG text chunk that marks 16-bit values as full-range [0, 1] (`is_full_range`)."""
    info = PngInfo()
    info.add_text(VALUES_KEY, FULL_RANGE_TEXT)
    return info


def is_full_range(image: Image.Image) -> bool:
    """Whether an image says it is vis2ir's full-range 16-bit infrared (the text chunk `write_png` writes)."""
    return image.info.get(VALUES_KEY) == FULL_RANGE_TEXT
