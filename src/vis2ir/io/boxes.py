"""Detection boxes as a semantic source: a data set's box annotations painted as palette maps.

The RGB-T detection sets (MSRS, KAIST, FLIR ADAS, LLVIP, M3FD) ship boxes, not segmentation maps.
`BoxLabels.open(PATH)` reads them in four formats, told apart by PATH:

| layout  | PATH                                   | one image          | a box (units)                                |
|---------|----------------------------------------|--------------------|----------------------------------------------|
| `coco`  | a `.json` file (or a folder of one     | `images[]` entry:  | `annotations[]`: `bbox` [x, y, w, h] from    |
|         | `.json` and no `.txt` / `.xml` files)  | `file_name`, size  | the top-left corner (pixels), `category_id`  |
| `voc`   | a folder of `.xml` files (sub-folders  | `NAME.xml`, with   | `<object>`: `<name>`, `<bndbox>` xmin ymin   |
|         | too)                                   | `<size>`           | xmax ymax (pixels)                           |
| `yolo`  | a folder of `.txt` files (sub-folders) | `NAME.txt`         | `class cx cy w h` (normalised to [0, 1])     |
| `kaist` | a folder of `.txt` files starting with | `NAME.txt`         | `label x y w h ...` from the top-left corner |
|         | a `% bbGt` line                        |                    | (pixels of the photo)                        |

A COCO annotation with a polygon `segmentation` (instance segmentation, as COCO itself has) is drawn as its
polygons, the object's own shape; one with an RLE mask, as its box.

Class names: COCO's `categories`, VOC's `<name>`, KAIST's label; YOLO's from `classes.txt` or
`obj.names` (a name a line, or `ID NAME` as MSRS writes it) or `data.yaml` / `dataset.yaml`
(`names:` a list or an {id: name} mapping) in PATH or up to two folders above it, else the ids
themselves ("0", "1", ...). Each name goes to a palette class by `palette.class_for_label`
(`people` -> person, `person?` -> person); a `class_map` of `NAME=CLASS` entries overrides that, and
`NAME=ignore` leaves such boxes out.

Samples find their annotation by name (a relative path without suffix, '/'-separated, as
`io.inputs.image_name` makes it): the annotation of the same name, else the one whose relative name
ends with the sample's or is the end of it (`train/00004N` <-> `00004N`), when only one does. Folder
formats key files by their path under PATH without suffix; COCO by `file_name` without suffix, less a
folder that every `file_name` starts with (FLIR's `data/`). Folder
files are read on first use and kept; COCO's JSON is read and checked once, at `open`.

Torch-free on purpose (numpy, Pillow, xml.etree and yaml): a lower layer than `vis2ir.data`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import yaml
from PIL import Image, ImageDraw

from vis2ir.errors import Vis2IRError, describe
from vis2ir.files import list_files
from vis2ir.palette import THING_IDS, VOID, class_for_label, class_id, colourise

log = logging.getLogger(__name__)

BACKGROUND = class_id("background")  # outside every box: declared "no annotated object here"
IGNORE = "ignore"  # the CLASS of a class_map entry that leaves a name's boxes out
CLASS_FILES = ("classes.txt", "obj.names", "data.yaml", "dataset.yaml")  # YOLO's class names, in this order
FORMATS = ("a COCO .json file, or a folder of Pascal VOC .xml, YOLO .txt (class cx cy w h) or KAIST .txt "
           "(% bbGt) files")
NORMALISED_SLACK = 0.01  # YOLO values a little outside [0, 1] (rounding of converters) are taken


class BoxError(Vis2IRError):
    """Box annotations that cannot be read or mapped: one line naming the file (or setting) and what was expected."""


class UnmappedClass(BoxError):
    """A box category that finds no palette class: a setting to give (the same for every file), not a bad file."""


@dataclass(frozen=True)
class Box:
    """One annotated box: its class name as written, its palette class id, and its edges `x0 <= x1`,
    `y0 <= y1` in the units of its `Annotation.size` (x to the right, y down, origin top-left).
    `polygons`: the object's outline where the annotation has one (COCO's polygon `segmentation`: flat
    x, y lists in the same units), drawn instead of the rectangle."""

    label: str
    class_id: int
    x0: float
    y0: float
    x1: float
    y1: float
    polygons: tuple[tuple[float, ...], ...] = ()


@dataclass(frozen=True)
class Annotation:
    """The boxes of one image (ignored ones left out, in file order), the frame they are in, and their file.

    `size`: (width, height) of the boxes' frame: the annotated image's pixels (COCO, VOC), (1, 1) for
    YOLO's normalised values, or None: pixels of the photo itself (KAIST; VOC without `<size>`).
    """

    boxes: tuple[Box, ...]
    size: tuple[float, float] | None
    source: Path


def draw(annotation: Annotation, width: int, height: int, photo_size: tuple[int, int] | None = None) -> np.ndarray:
    """The semantic map of `annotation` at `width` x `height`: uint8 RGB `[height, width, 3]` palette colours.

    Outside every box is class `background` (not VOID). Boxes are painted largest first (area in
    output pixels, ties in file order), so a small box inside a big one stays visible; a thing
    class's boxes are numbered in painting order and shaded apart (`palette.colourise`'s instances;
    27 shades, then they repeat), a stuff class's all get instance 0. Coordinates are scaled from
    `annotation.size` to the output (when None: from `photo_size`, the (width, height) of the photo
    the boxes were drawn on, else taken as output pixels), rounded to pixel edges and clipped to the
    image; a box inside the image covers at least one pixel, one wholly outside none.
    """
    return np.array(draw_image(annotation, width, height, photo_size))


def draw_image(annotation: Annotation, width: int, height: int,
               photo_size: tuple[int, int] | None = None) -> Image.Image:
    """`draw`'s map as an RGB PIL image, each rectangle filled with its colour (no per-pixel work: about 0.1 ms
    for 1280×1024, where a per-pixel palette lookup took 30 ms; the loader draws one per sample)."""
    image = Image.new("RGB", (width, height), _colour(BACKGROUND, 0))
    pen = ImageDraw.Draw(image)
    frame = annotation.size or photo_size or (width, height)
    numbered: dict[int, int] = {}
    for box, rectangle in _placed(annotation, width, height, photo_size):
        k = numbered.get(box.class_id, 0)
        numbered[box.class_id] = k + 1
        colour = _colour(box.class_id, k if box.class_id in THING_IDS else 0)
        if box.polygons:  # the outline, in output pixels (a pixel is filled when its centre lies inside)
            for poly in box.polygons:
                pen.polygon([(x * width / frame[0] - 0.5, y * height / frame[1] - 0.5)
                             for x, y in zip(poly[::2], poly[1::2])], fill=colour)
        else:
            image.paste(colour, rectangle)
    return image


def _colour(cid: int, instance: int) -> tuple[int, int, int]:
    r, g, b = colourise(np.array(cid), np.array(instance)).tolist()
    return r, g, b


def _placed(annotation: Annotation, width: int, height: int, photo_size) -> list[tuple[Box, tuple[int, ...]]]:
    """Each box of `annotation` with its pixel rectangle (x0, y0, x1, y1, end exclusive), largest first."""
    frame = annotation.size or photo_size or (width, height)
    sx, sy = width / frame[0], height / frame[1]
    placed = []
    for box in annotation.boxes:
        xs = _span(box.x0 * sx, box.x1 * sx, width)
        ys = _span(box.y0 * sy, box.y1 * sy, height)
        if xs is not None and ys is not None:
            placed.append((box, (xs[0], ys[0], xs[1], ys[1])))
    placed.sort(key=lambda p: -(p[1][2] - p[1][0]) * (p[1][3] - p[1][1]))  # stable: ties keep file order
    return placed


def _span(start: float, end: float, size: int) -> tuple[int, int] | None:
    """Pixel span [a, b) of the edges start..end on an axis of `size` pixels: rounded, clipped, at least one
    pixel; None when wholly outside."""
    if end < 0 or start >= size or (end == 0 and start < end):
        return None
    a = min(max(math.floor(start + 0.5), 0), size - 1)
    b = min(max(math.floor(end + 0.5), a + 1), size)
    return a, b


def class_counts(annotation: Annotation) -> dict[int, int]:
    """The number of boxes of each palette class id in `annotation` (ignored boxes are not in it), by id."""
    counts: dict[int, int] = {}
    for box in annotation.boxes:
        counts[box.class_id] = counts.get(box.class_id, 0) + 1
    return dict(sorted(counts.items()))


class BoxLabels:
    """The box annotations of a data set (one of the layouts of the module's table), looked up by sample name."""

    def __init__(self, path: Path, layout: str, files: dict[str, Path], classes: _Classes,
                 names: dict[int, str] | None = None, class_file: Path | None = None,
                 coco: dict[str, Annotation] | None = None):
        self.path, self.layout, self.class_file = path, layout, class_file
        self._files, self._classes, self._names = files, classes, names
        self._cache: dict[str, Annotation] = dict(coco or {})
        self._keys = sorted(coco) if coco is not None else sorted(files)
        self._bare: dict[str, list[str]] = {}
        for key in self._keys:
            self._bare.setdefault(key.rsplit("/", 1)[-1], []).append(key)

    @classmethod
    def open(cls, path: str | Path, class_map: Sequence[str] = (), setting: str = "data.box_classes") -> BoxLabels:
        """The annotations at `path` (layout told by the module's table). `class_map`: `NAME=CLASS` entries
        (CLASS a palette class name or alias, or `ignore`) over `palette.class_for_label`; `setting` is
        what the errors name for them. Raises `BoxError`: no such path, no annotations there, a bad
        `class_map` entry; for COCO also any malformed content or unmapped category (read at once)."""
        path = Path(path)
        classes = _Classes(class_map, setting)
        if not path.exists():
            raise BoxError(f"{path}: no such file or folder; expected {FORMATS}")
        if path.is_file():
            if path.suffix.lower() != ".json":
                raise BoxError(f"{path}: a single file must be COCO .json; expected {FORMATS}")
            return cls(path, "coco", {}, classes, coco=_read_coco(path, classes))
        found = _scan(path)
        if found[".xml"]:
            return cls(path, "voc", _keyed(path, found[".xml"]), classes)
        if found[".txt"]:
            files = _keyed(path, found[".txt"])
            if _is_kaist(found[".txt"]):
                return cls(path, "kaist", files, classes)
            names, class_file = _yolo_names(path)
            return cls(path, "yolo", files, classes, names, class_file)
        if len(found[".json"]) == 1:
            return cls.open(found[".json"][0], class_map, setting)
        what = f"{len(found['.json'])} .json files" if found[".json"] else "no annotation files"
        raise BoxError(f"{path}: {what}; expected {FORMATS}")

    def check_classes(self) -> None:
        """Map now every class name known without reading the annotation files (YOLO's class file; COCO's categories
        were mapped at `open`), so that an unmapped one stops a run before its work. Raises `UnmappedClass`."""
        for name in (self._names or {}).values():
            self._classes(name, self.class_file or self.path)

    def names(self) -> list[str]:
        """The annotation keys, sorted: relative paths without suffix (COCO: `file_name` without suffix)."""
        return list(self._keys)

    def has(self, name: str) -> bool:
        """Whether sample `name` has an annotation (no file is read). Raises `BoxError` when several would match."""
        return self._key(name) is not None

    def source(self, name: str) -> Path | None:
        """The file holding sample `name`'s boxes (COCO: the JSON file), None when it has none; no file is read.
        Raises `BoxError` when several would match."""
        key = self._key(name)
        return None if key is None else self._files.get(key, self.path)

    def find(self, name: str) -> Annotation | None:
        """The annotation of sample `name` (module docstring: matching), None when it has none (an empty
        file or a COCO image without annotations: zero boxes). Raises `BoxError` when the file is
        malformed, a class name maps to no palette class, or several annotations would go with `name`."""
        key = self._key(name)
        if key is None:
            return None
        if key not in self._cache:
            self._cache[key] = self._read(self._files[key])
        return self._cache[key]

    def draw(self, annotation: Annotation | None, width: int, height: int,
             photo_size: tuple[int, int] | None = None) -> np.ndarray:
        """`draw` (module function): uint8 RGB `[height, width, 3]` palette map of `annotation`; None (a sample
        without annotation) gives a map of background only."""
        return np.array(self.draw_image(annotation, width, height, photo_size))

    def draw_image(self, annotation: Annotation | None, width: int, height: int,
                   photo_size: tuple[int, int] | None = None) -> Image.Image:
        """`draw` as an RGB PIL image (`draw_image`, the module function): what the loader and generate use."""
        if annotation is None:
            annotation = Annotation((), None, self.path)
        return draw_image(annotation, width, height, photo_size)

    def _key(self, name: str) -> str | None:
        if name in self._cache or name in self._files:
            return name
        name = name.strip("/")
        fits = [k for k in self._bare.get(name.rsplit("/", 1)[-1], ())
                if k == name or k.endswith("/" + name) or name.endswith("/" + k)]
        if len(fits) > 1:
            listed = ", ".join(fits[:3]) + (", ..." if len(fits) > 3 else "")
            raise BoxError(f"{self.path}: sample {name} would go with {len(fits)} annotations ({listed}); pass the "
                           f"folder of one set, or name the samples with their sub-folders")
        return fits[0] if fits else None

    def _read(self, file: Path) -> Annotation:
        if self.layout == "voc":
            size, raw = _read_voc(file)
        elif self.layout == "yolo":
            size, raw = (1.0, 1.0), _read_yolo(file, self._names, self.class_file)
        else:
            size, raw = None, _read_kaist(file)
        return Annotation(_mapped(raw, self._classes, file), size, file)


# ----------------------------------------------------------------------------------------------
# Class names -> palette classes



def open_for(path: str | Path, names: Sequence[str], class_map: Sequence[str] = (), option: str = "data.boxes",
             setting: str = "data.box_classes", what: str = "sample") -> BoxLabels:
    """`BoxLabels.open`, checked against the sample `names` it is for (`data.boxes` for a data set, `--boxes`
    for generate: `option`, `setting` and `what` are the words of its messages). Names without an annotation
    are drawn as background only (no object annotated there, as YOLO sets leave such files out), counted in one
    warning. Raises `BoxError` (one line, starting with `option`) where `BoxLabels.open` does, and when no name
    has an annotation (a wrong folder)."""
    try:
        labels = BoxLabels.open(path, class_map, setting)
    except BoxError as err:
        raise BoxError(f"{option}: {err}") from None
    missing = [name for name in names if not labels.has(name)]
    if names and len(missing) == len(names):
        raise BoxError(f"{option}={path}: no box annotations for any {what} ({labels.layout} layout; e.g. none for "
                       f"{missing[0]!r}): the annotation files are named like the {what}s (split sub-folders "
                       "included, or bare names)")
    if missing:
        log.warning("%s: %d of %d %ss have no box annotations in %s (e.g. %s): drawn as background only", option,
                    len(missing), len(names), what, path, missing[0])
    return labels


class _Classes:
    """Class name -> palette class id (None: ignored), by the user's `NAME=CLASS` entries, then `class_for_label`."""

    def __init__(self, class_map: Sequence[str], setting: str):
        self.setting = setting
        self.overrides: dict[str, int | None] = {}
        for entry in [class_map] if isinstance(class_map, str) else class_map:
            name, eq, target = str(entry).rpartition("=")
            name, target = name.strip(), target.strip()
            if not eq or not name or not target:
                raise BoxError(f"{setting}: {entry!r} is not NAME=CLASS (e.g. people=person, or sign=ignore)")
            cid = None if target.lower() == IGNORE else class_for_label(target)
            if cid == VOID:
                raise BoxError(f"{setting}: {entry!r}: {target!r} is no palette class; CLASS is a class of "
                               f"vis2ir.palette (docs/data.md), an alias such as people, or {IGNORE}")
            if self.overrides.get(name.lower(), cid) != cid:
                raise BoxError(f"{setting}: {name!r} is mapped twice, to different classes; keep one entry")
            self.overrides[name.lower()] = cid

    def __call__(self, label: str, file: Path) -> int | None:
        key = label.strip().lower()
        if key in self.overrides:
            return self.overrides[key]
        cid = class_for_label(label)
        if cid == VOID:
            raise UnmappedClass(f"{file}: box class {label!r} is no palette class; map it with {self.setting} "
                                f"(NAME=CLASS: {label}=CLASS with a class of vis2ir.palette such as person, car or "
                                f"stop sign, or {label}={IGNORE} to leave its boxes out)")
        return cid


def _mapped(raw: list[tuple], classes: _Classes, file: Path) -> tuple[Box, ...]:
    """(label, x0, y0, x1, y1) rows -> Boxes with their palette class; ignored labels left out."""
    boxes = []
    for label, *edges in raw:
        cid = classes(label, file)
        if cid is not None:
            boxes.append(Box(label, cid, *edges[:4], *edges[4:]))
    return tuple(boxes)


# ----------------------------------------------------------------------------------------------
# Folders of files (VOC, YOLO, KAIST)


def _scan(folder: Path) -> dict[str, list[Path]]:
    """The .xml, .txt (class-name files left out) and .json files under `folder`, hidden ones left out, sorted."""
    found: dict[str, list[Path]] = {".xml": [], ".txt": [], ".json": []}
    for p in list_files(folder, recursive=True):
        if p.suffix.lower() in found and p.name.lower() not in CLASS_FILES:
            found[p.suffix.lower()].append(p)
    return found


def _keyed(folder: Path, files: list[Path]) -> dict[str, Path]:
    """Annotation files by key: their path under `folder` without suffix, '/'-separated."""
    keyed: dict[str, Path] = {}
    for p in files:
        key = p.relative_to(folder).with_suffix("").as_posix()
        if key in keyed:
            raise BoxError(f"{keyed[key]} and {p} both annotate {key}: keep one")
        keyed[key] = p
    log.debug("%s: %d annotation files", folder, len(keyed))
    return keyed


def _lines(file: Path) -> list[str]:
    try:
        return file.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BoxError(f"{file}: cannot be read as text ({describe(e)})") from None


def _is_kaist(files: list[Path]) -> bool:
    """Whether the first non-empty .txt file starts with KAIST's `% bbGt` header."""
    for file in files:
        if file.stat().st_size:
            first = next((line.strip() for line in _lines(file) if line.strip()), "")
            return first.startswith("% bbGt")
    return False


def _numbers(fields: list[str], where: str, expected: str) -> list[float]:
    try:
        values = [float(f) for f in fields]
    except ValueError:
        raise BoxError(f"{where}: {' '.join(fields)!r} are not all numbers; expected {expected}") from None
    if not all(math.isfinite(v) for v in values):
        raise BoxError(f"{where}: {' '.join(fields)!r} are not all finite numbers; expected {expected}")
    return values


def _read_yolo(file: Path, names: dict[int, str] | None, class_file: Path | None) -> list[tuple]:
    expected = "YOLO's 5 fields `class cx cy w h` (class id, then normalised to [0, 1])"
    rows = []
    for n, line in enumerate(_lines(file), 1):
        fields, where = line.split(), f"{file} line {n}"
        if not fields:
            continue
        if len(fields) != 5:
            raise BoxError(f"{where}: {len(fields)} fields; expected {expected}")
        if not fields[0].isdigit():
            raise BoxError(f"{where}: class {fields[0]!r} is not a class id (0, 1, ...); expected {expected}")
        cx, cy, w, h = _numbers(fields[1:], where, expected)
        if w < 0 or h < 0:
            raise BoxError(f"{where}: negative width or height; expected {expected}")
        if not all(-NORMALISED_SLACK <= v <= 1 + NORMALISED_SLACK for v in (cx, cy, w, h)):
            raise BoxError(f"{where}: values outside [0, 1] (pixels?); expected {expected}")
        cls = int(fields[0])
        if names is not None and cls not in names:
            raise BoxError(f"{where}: class id {cls} is not in {class_file} (ids {min(names)}-{max(names)})")
        rows.append((str(cls) if names is None else names[cls], cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    return rows


def _read_kaist(file: Path) -> list[tuple]:
    expected = "KAIST's `label x y w h ...` (pixels, top-left corner) after the `% bbGt` line"
    rows = []
    for n, line in enumerate(_lines(file), 1):
        fields, where = line.split(), f"{file} line {n}"
        if not fields or fields[0].startswith("%"):
            continue
        if len(fields) < 5:
            raise BoxError(f"{where}: {len(fields)} fields; expected {expected}")
        x, y, w, h = _numbers(fields[1:5], where, expected)
        if w < 0 or h < 0:
            raise BoxError(f"{where}: negative width or height; expected {expected}")
        rows.append((fields[0], x, y, x + w, y + h))
    return rows


def _read_voc(file: Path) -> tuple[tuple[float, float] | None, list[tuple]]:
    """A Pascal VOC file's (width, height) (None without `<size>` or with a zero one) and box rows."""
    try:
        root = ET.parse(file).getroot()
    except (ET.ParseError, OSError) as e:
        raise BoxError(f"{file}: not readable XML ({describe(e)}); expected a Pascal VOC annotation") from None
    if root.tag != "annotation":
        raise BoxError(f"{file}: root element <{root.tag}>; expected Pascal VOC's <annotation>")
    size = None
    if root.find("size") is not None:
        width, height = _numbers([root.findtext(f"size/{t}") or "?" for t in ("width", "height")], str(file),
                                 "<size> with numeric <width> and <height>")
        if width < 0 or height < 0:
            raise BoxError(f"{file}: negative <size>; expected the image's <width> and <height> in pixels")
        size = (width, height) if width > 0 and height > 0 else None
    rows = []
    for i, obj in enumerate(root.findall("object"), 1):
        label = (obj.findtext("name") or "").strip()
        where, expected = f"{file}: object {i} ({label or 'no name'})", "<name> and <bndbox> xmin ymin xmax ymax"
        if not label or obj.find("bndbox") is None:
            raise BoxError(f"{where}: expected {expected}")
        x0, y0, x1, y1 = _numbers([obj.findtext(f"bndbox/{t}") or "?" for t in ("xmin", "ymin", "xmax", "ymax")],
                                  where, expected)
        if x1 < x0 or y1 < y0:
            raise BoxError(f"{where}: xmax < xmin or ymax < ymin; expected {expected} (pixels)")
        rows.append((label, x0, y0, x1, y1))
    return size, rows


def _yolo_names(folder: Path) -> tuple[dict[int, str] | None, Path | None]:
    """YOLO's class names (id -> name) from the first of `CLASS_FILES` in `folder` or up to two folders above."""
    for place in (folder, folder.parent, folder.parent.parent):
        for name in CLASS_FILES:
            if (place / name).is_file():
                log.debug("%s: YOLO class names from %s", folder, place / name)
                return _read_names(place / name), place / name
    log.info("%s: no YOLO class names (%s): the class ids are the names", folder, ", ".join(CLASS_FILES))
    return None, None


def _read_names(file: Path) -> dict[int, str]:
    if file.suffix == ".yaml":
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise BoxError(f"{file}: not readable YAML ({describe(e)}); expected a mapping with names:") from None
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, list):
            return {i: str(n) for i, n in enumerate(names)}
        if isinstance(names, dict) and all(isinstance(k, int) for k in names):
            return {k: str(v) for k, v in names.items()}
        raise BoxError(f"{file}: expected names: (a list of class names, or an {{id: name}} mapping)")
    lines = [line.strip() for line in _lines(file) if line.strip()]
    if not lines:
        raise BoxError(f"{file}: no class names; expected one name a line (or `ID NAME`)")
    numbered = [re.fullmatch(r"(\d+)\s+(\S.*)", line) for line in lines]
    if all(numbered):
        return {int(m.group(1)): m.group(2) for m in numbered}
    return dict(enumerate(lines))


# ----------------------------------------------------------------------------------------------
# COCO


def _read_coco(file: Path, classes: _Classes) -> dict[str, Annotation]:
    """Every image of a COCO detection file as key (file_name without suffix) -> Annotation, checked."""
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BoxError(f"{file}: not readable JSON ({describe(e)}); expected COCO detection annotations") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                   "categories")):
        raise BoxError(f"{file}: not COCO detection annotations; expected a JSON object with the lists images, "
                       f"annotations and categories")
    labels = {_entry(c, ("id", "name"), file, f"categories[{i}]")["id"]: str(c["name"])
              for i, c in enumerate(data["categories"])}
    images, keys = {}, {}
    for i, image in enumerate(data["images"]):
        image = _entry(image, ("id", "file_name", "width", "height"), file, f"images[{i}]")
        key = PurePosixPath(str(image["file_name"]).replace("\\", "/")).with_suffix("").as_posix()
        if key in keys:
            raise BoxError(f"{file}: images[{i}]: a second image named {image['file_name']}; expected one each")
        width, height = _numbers([str(image["width"]), str(image["height"])], f"{file}: images[{i}]",
                                 "its width and height in pixels")
        if width <= 0 or height <= 0:
            raise BoxError(f"{file}: images[{i}]: width and height must be positive (pixels)")
        keys[key], images[image["id"]] = image["id"], ((width, height), [])
    for i, ann in enumerate(data["annotations"]):
        where = f"{file}: annotations[{i}]"
        ann = _entry(ann, ("image_id", "bbox", "category_id"), file, f"annotations[{i}]")
        if ann["image_id"] not in images:
            raise BoxError(f"{where}: image_id {ann['image_id']!r} is not the id of any of the images")
        if ann["category_id"] not in labels:
            raise BoxError(f"{where}: category_id {ann['category_id']!r} is not the id of any of the categories")
        if not isinstance(ann["bbox"], list) or len(ann["bbox"]) != 4:
            count = len(ann["bbox"]) if isinstance(ann["bbox"], list) else "no list of"
            raise BoxError(f"{where}: bbox has {count} values; expected 4: [x, y, width, height] in pixels")
        bbox = ann["bbox"]
        x, y, w, h = _numbers([str(v) for v in bbox], where, "bbox [x, y, width, height] in pixels")
        if w < 0 or h < 0:
            raise BoxError(f"{where}: bbox has a negative width or height; expected [x, y, width, height] in pixels")
        images[ann["image_id"]][1].append((labels[ann["category_id"]], x, y, x + w, y + h, _polygons(ann)))
    log.debug("%s: COCO, %d images, %d boxes", file, len(images), len(data["annotations"]))
    shared = {key.split("/", 1)[0] if "/" in key else None for key in keys}
    cut = len(shared.pop()) + 1 if len(shared) == 1 and None not in shared else 0  # FLIR's data/, thermal_8_bit/
    return {key[cut:]: Annotation(_mapped(images[i][1], classes, file), images[i][0], file) for key, i in keys.items()}


def _polygons(ann: dict) -> tuple[tuple[float, ...], ...]:
    """An annotation's polygon `segmentation` (lists of x, y pixels, 3 points or more), () for none or an RLE mask
    (which is drawn as its box)."""
    seg = ann.get("segmentation")
    if not isinstance(seg, list):
        return ()
    return tuple(tuple(float(v) for v in poly) for poly in seg if isinstance(poly, list) and len(poly) >= 6
                 and len(poly) % 2 == 0 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in poly))


def _entry(entry, fields: tuple[str, ...], file: Path, where: str) -> dict:
    if (not isinstance(entry, dict) or any(f not in entry for f in fields)
            or any(not isinstance(entry[f], (int, str)) for f in fields if f.endswith("id"))):
        raise BoxError(f"{file}: {where} is not an object with {', '.join(fields)}; expected COCO detection "
                       f"annotations")
    return entry
