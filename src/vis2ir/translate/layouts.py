"""The layout of a labelled RGB data set that `vis2ir translate` turns into infrared: which files are the photos to
translate, where their box annotations are, and how the rest of the data set is carried over to the output.

| layout  | what is looked for (`detect`, in this order)            | photos                 | annotation sources     |
|---------|---------------------------------------------------------|------------------------|------------------------|
| `coco`  | `.json` objects with an `images` list at the source's   | every image the files  | the files with         |
|         | top or up to 2 folders down (`annotations/instances_    | reference, once        | `categories` and boxed |
|         | train2017.json`, FLIR's `images_thermal_train/...`)     |                        | `annotations`          |
| `yolo`  | `images/` with `labels/` beside it (split sub-folders)  | images under `images/` | `labels/`              |
| `voc`   | folders with `JPEGImages/` and `Annotations/`: the      | images under each      | each `Annotations/`    |
|         | source or up to 2 folders down (`VOCdevkit/VOC2007`)    | `JPEGImages/`          |                        |
| `plain` | any folder of images (sub-folders too)                  | every image            | none                   |

A COCO file's images are looked for, in order, in its folder, that folder's parent, `parent/<the file's stem after
its last '_'>` (`train2017` for `instances_train2017.json`), `parent/images` and `parent/images/<stem>`: the first
place holding the first few `file_name`s (places outside the source are not tried). Referenced images missing on
disk are left out (one warning) and their entries dropped from the output, like failed photos. With `auto`, COCO
files whose images are not found are passed over (a warning) when a YOLO or VOC layout fits instead.

A photo's annotation key is the name `BoxLabels.find` looks its boxes up by (`vis2ir.io.boxes`): COCO's `file_name`
without suffix, less a folder every `file_name` of the file starts with; YOLO's and VOC's path under
`images/` / `JPEGImages/` without suffix. A YOLO photo without a label file keeps the `labels/` source (YOLO's
convention: no file, no object; `find` gives None, drawn as background); a VOC photo without an XML has none (-1).

`Layout.carry_over` writes the rest of the data set (annotations, class lists, split lists, READMEs) at the same
relative paths under the output folder, edited only where a photo's output name changes (`.png` output) or a photo
failed (its annotations are left out), byte-identical otherwise.

Torch-free (json, re, yaml-free line edits): the runner imports it before any model.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from vis2ir.errors import Vis2IRError, describe
from vis2ir.files import atomic_write, is_hidden, list_files, name_problem, write_bytes
from vis2ir.io.boxes import CLASS_FILES
from vis2ir.io.images import IMAGE_SUFFIXES
from vis2ir.io.inputs import image_name, list_images
from vis2ir.translate.edits import (COPY, Carried, Copied, ids_dropped, list_edited, suffix_swap, voc_renamed,
                                    yaml_moved)

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "coco", "yolo", "voc", "plain")
FORMATS = ("source", "png")  # `output_rel`'s output formats: the photo's own suffix, or PNG
PROBE = 5  # the `file_name`s of a COCO file checked to find the folder its images are in
NAMES = {"coco": "COCO", "yolo": "YOLO", "voc": "Pascal VOC", "plain": "plain folder"}
_WANTED = {"coco": "a COCO annotation file (a .json object with an images list) at its top or up to 2 folders down",
           "yolo": "an images/ folder with a labels/ folder beside it", "plain": "image files",
           "voc": "a folder with both JPEGImages/ and Annotations/ (the source itself or up to 2 folders down)"}


class LayoutError(Vis2IRError):
    """A source folder that is not the layout asked for, or holds no usable photos: one line naming the path and
    what was expected."""


@dataclass(frozen=True)
class Photo:
    """One photo to translate: `rel` its path under the source root ('/'-separated, suffix included), `labels` the
    index into `Layout.labels` of the annotation source holding its boxes (-1: none), `key` the name
    `BoxLabels.find` looks them up by there ('' when `labels` is -1)."""

    rel: str
    labels: int
    key: str


def output_rel(rel: str, fmt: str) -> str:
    """The output photo's relative path for source photo `rel`: `fmt` "source" keeps it, "png" gives it the suffix
    `.png` (`train/a.jpg` -> `train/a.png`). Raises `Vis2IRError` for another `fmt`."""
    if fmt == "source":
        return rel
    if fmt == "png":
        return PurePosixPath(rel).with_suffix(".png").as_posix()
    raise Vis2IRError(f"output format {fmt!r}: expected one of {', '.join(FORMATS)}")


@dataclass
class Layout:
    """A detected data set (`detect`): its `kind` (a `LAYOUTS` entry but auto), `root` folder and annotation sources
    (`labels`: paths `BoxLabels.open` takes). The plain layout; the others are subclasses."""

    kind: str
    root: Path
    labels: list[Path]
    listed: list[Photo] = field(default_factory=list, repr=False)
    detail: str = ""  # describe()'s words after the layout's name

    def photos(self) -> list[Photo]:
        """The photos to translate, sorted by `rel`, each once."""
        return list(self.listed)

    def describe(self) -> str:
        """One line for logs and the data-set card: "COCO: 2 annotation files, 5,000 photos"."""
        return f"{NAMES[self.kind]}: {self.detail}"

    def carry_over(self, out: Path, renamed: Callable[[str], str], failed: set[str]) -> list[Path]:
        """Write every file of the data set that is not a photo (and that the layout keeps) at the same relative
        path under `out` (atomically: `files.atomic_write`), edited for the output: `renamed(rel)` is the output
        path of photo `rel` (only its suffix may differ), the photos in `failed` (rels) have their annotations left
        out. Files under `out`, when it lies inside the source, are not carried. Returns the written paths, sorted.
        Raises `Vis2IRError` when a file cannot be written (`files.atomic_write`), `ValueError` when `renamed`
        changes more than a suffix."""
        carry = self._carrier(Path(out), renamed, set(failed))
        if carry is None:
            return []
        photos, written = {p.rel for p in self.listed}, []
        out_abs = os.path.abspath(out)
        for src in list_files(self.root, recursive=True):
            if _inside(os.path.abspath(src), out_abs):
                continue
            rel = src.relative_to(self.root).as_posix()
            what = None if rel in photos else carry(rel, src)
            if what is None:
                continue
            dst = Path(out) / rel
            if isinstance(what, Copied):
                atomic_write(dst, lambda tmp, s=src: shutil.copyfile(s, tmp))
            else:
                write_bytes(dst, what)
            written.append(dst)
        log.info("%s: carried %d files over to %s", self.root, len(written), out)
        return written

    def _carrier(self, out: Path, renamed: Callable[[str], str], failed: set[str]
                 ) -> Callable[[str, Path], Carried] | None:
        """What each non-photo file (rel, path) becomes in `out`; None: nothing is carried (plain)."""
        return None


def detect(source: str | Path, kind: str = "auto") -> Layout:
    """The layout of the data set in folder `source`: `kind` one of `LAYOUTS` ("auto": the first that fits, in the
    module's order, else plain). Raises `LayoutError`: no such folder, an unknown `kind`, a `kind` that does not
    fit (naming what is missing), a COCO file whose images are not found, no photos, or a photo path that cannot
    name an output file (`files.name_problem`)."""
    root = Path(source).expanduser()
    if kind not in LAYOUTS:
        raise LayoutError(f"layout {kind!r}: expected one of {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise LayoutError(f"{root}: no such folder; expected a data set folder ({', '.join(LAYOUTS[1:])} layout)")
    if kind != "auto":
        layout = {"coco": _coco, "yolo": _yolo, "voc": _voc, "plain": _plain}[kind](root)
        if layout is None:
            raise LayoutError(f"{root}: not the {NAMES[kind]} layout; expected {_WANTED[kind]}")
    else:
        try:
            layout = _coco(root) or _yolo(root) or _voc(root) or _plain(root)
        except LayoutError as err:  # COCO files whose images are not found (mmdetection's JSONs beside a VOC set)
            layout = _yolo(root) or _voc(root)  # are passed over when another layout with annotations fits
            if layout is None:
                raise
            log.warning("%s: not taken as COCO (%s)", root, err)
    log.info("%s: %s", root, layout.describe())
    return layout


def _checked(root: Path, photos: Iterable[Photo], what: str) -> list[Photo]:
    """`photos` sorted by rel; LayoutError when there are none or a rel cannot name an output file."""
    photos = sorted(photos, key=lambda p: p.rel)
    if not photos:
        raise LayoutError(f"{root}: no photos ({what}); expected image files ({' '.join(IMAGE_SUFFIXES[:5])} ...)")
    for p in photos:
        problem = name_problem(p.rel)
        if problem:
            raise LayoutError(f"{root}: photo {p.rel!r} {problem}; expected a relative path inside the source "
                              "(parts separated by '/', none empty, '.' or '..')")
    return photos


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}{'' if n == 1 else 's'}"


# ----------------------------------------------------------------------------------------------
# Plain


def _plain(root: Path) -> Layout:
    photos = [Photo(p.relative_to(root).as_posix(), -1, "") for p in list_images(root, recursive=True)]
    layout = Layout("plain", root, [], _checked(root, photos, "no image files under it"))
    layout.detail = f"{_count(len(layout.listed), 'photo')}, no annotations"
    return layout


# ----------------------------------------------------------------------------------------------
# COCO


@dataclass
class _CocoFile:
    """A COCO JSON under the source: its rel, the folder (rel, '' the root) its `file_name`s are under, the
    `file_name`s as written, and whether it holds boxes (`categories` and `annotations` with `bbox`)."""

    rel: str
    base: str
    names: list[str]
    boxes: bool


def _coco_rel(base: str, name: str) -> str:
    """The rel of the photo a COCO `file_name` names in image folder `base` (backslashes read as '/')."""
    return (PurePosixPath(base) / name.replace("\\", "/")).as_posix()


def coco_keys(names: list[str]) -> list[str]:
    """The `BoxLabels` keys of a COCO file's `file_name`s (`vis2ir.io.boxes._read_coco`'s rule): each without
    suffix, less a first folder that every one of them starts with (FLIR's `data/`)."""
    keys = [PurePosixPath(n.replace("\\", "/")).with_suffix("").as_posix() for n in names]
    shared = {k.split("/", 1)[0] if "/" in k else None for k in keys}
    cut = len(next(iter(shared))) + 1 if len(shared) == 1 and None not in shared else 0
    return [k[cut:] for k in keys]


@dataclass
class CocoLayout(Layout):
    """The COCO layout: `files` every COCO JSON found, `missing` the rels of referenced images not on disk."""

    files: list[_CocoFile] = field(default_factory=list, repr=False)
    missing: frozenset[str] = frozenset()

    def _carrier(self, out, renamed, failed):
        dropped = failed | self.missing
        jsons = {f.rel: f for f in self.files}

        def carry(rel: str, src: Path) -> Carried:
            if rel in jsons:
                return _coco_edited(src, jsons[rel], renamed, dropped)
            return None if src.suffix.lower() in IMAGE_SUFFIXES else COPY
        return carry


def _coco_file(root: Path, path: Path) -> _CocoFile | None:
    """`path` as a COCO file (None when it is not one), with the folder its images are in."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        log.warning("%s: not readable JSON (%s): not taken as a COCO file, copied as it is", path, describe(e))
        return None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not all(isinstance(i, dict) and "file_name" in i for i in images):
        return None
    names = [str(i["file_name"]) for i in images]
    for n, name in enumerate(names):
        if not name.strip() or PurePosixPath(name.replace("\\", "/")).name in ("", ".", ".."):
            raise LayoutError(f"{path}: images[{n}] has the file_name {name!r}; expected an image file's name")
    anns = data.get("annotations")
    boxes = (isinstance(data.get("categories"), list) and isinstance(anns, list)
             and any(isinstance(a, dict) and "bbox" in a for a in anns))
    rel = path.relative_to(root).as_posix()
    return _CocoFile(rel, _coco_base(root, path, names), names, boxes)


def _coco_base(root: Path, path: Path, names: list[str]) -> str:
    """The folder (rel) a COCO file's images are in: the first of the module's places holding its first `PROBE`
    `file_name`s, else the one holding most of them. LayoutError when none holds any."""
    if not names:
        return path.parent.relative_to(root).as_posix()
    folder, stem = path.parent, path.stem.rsplit("_", 1)[-1]
    places = [folder, folder.parent, folder.parent / stem, folder.parent / "images", folder.parent / "images" / stem]
    top, best, most, tried = os.path.abspath(root), None, 0, []
    for place in places:
        if not _inside(os.path.abspath(place), top) or place in tried:
            continue
        tried.append(place)
        base = place.relative_to(root).as_posix()
        found = sum((root / _coco_rel(base, n)).is_file() for n in names[:PROBE])
        if found == len(names[:PROBE]):
            return base
        if found > most:
            best, most = base, found
    if best is None:
        where = ", ".join(str(p) for p in tried)
        raise LayoutError(f"{path}: none of its images (e.g. {names[0]}) is in {where}; expected the images beside "
                          "the COCO file, in its parent folder, or in images/ or a folder named like the file's split")
    log.warning("%s: only %d of its first %d images are in %s", path, most, len(names[:PROBE]), root / best)
    return best


def _coco(root: Path) -> CocoLayout | None:
    paths = [p for pattern in ("*.json", "*/*.json", "*/*/*.json") for p in list_files(root, pattern)]
    files = [f for f in (_coco_file(root, p) for p in sorted(paths)) if f is not None]
    if not files:
        return None
    order = sorted(files, key=lambda f: (not f.boxes, not PurePosixPath(f.rel).name.startswith("instances"), f.rel))
    present = {p.relative_to(root).as_posix() for p in list_files(root, recursive=True)}
    photos: dict[str, Photo] = {}
    labels: list[Path] = []
    missing: set[str] = set()
    for f in order:
        index = -1
        for name, key in zip(f.names, coco_keys(f.names)):
            rel = _coco_rel(f.base, name)
            if rel in photos or rel in missing:
                continue
            if name_problem(rel) is None and rel not in present and not (root / rel).is_file():
                missing.add(rel)
                continue
            if f.boxes and index < 0:
                labels.append(root / f.rel)
                index = len(labels) - 1
            photos[rel] = Photo(rel, index, key) if f.boxes else Photo(rel, -1, "")
    listed = _checked(root, photos.values(), f"the {_count(len(files), 'COCO file')} reference no image on disk")
    if missing:
        log.warning("%s: %s the COCO files reference are not there (e.g. %s): left out, and their entries dropped "
                    "from the output's COCO files", root, _count(len(missing), "image"), sorted(missing)[0])
    unreferenced = sum(1 for r in present if PurePosixPath(r).suffix.lower() in IMAGE_SUFFIXES and r not in photos)
    detail = f"{_count(len(files), 'annotation file')}, {_count(len(listed), 'photo')}"
    if len(labels) != len(files):
        detail += f" ({len(labels)} of the files with boxes)"
    if unreferenced:
        detail += f"; {_count(unreferenced, 'image file')} no annotation file references, left out"
    if missing:
        detail += f"; {_count(len(missing), 'referenced image')} missing"
    return CocoLayout("coco", root, labels, listed, detail, files, frozenset(missing))


def _coco_edited(src: Path, f: _CocoFile, renamed: Callable[[str], str], dropped: set[str]) -> Carried:
    """COCO file `f` for the output: `file_name`s renamed, dropped images and their annotations removed (COPY when
    nothing changes: byte-identical)."""
    rels = [_coco_rel(f.base, n) for n in f.names]
    if not any(r in dropped or renamed(r) != r for r in rels):
        return COPY
    text = src.read_text(encoding="utf-8-sig")
    data = json.loads(text)
    kept, gone = [], set()
    for image, rel in zip(data["images"], rels):
        if rel in dropped:
            if isinstance(image.get("id"), (int, str)):
                gone.add(image["id"])
            continue
        name = suffix_swap(str(image["file_name"]), rel, renamed(rel))
        if name is not None:
            image["file_name"] = name
        kept.append(image)
    data["images"] = kept
    if isinstance(data.get("annotations"), list):
        data["annotations"] = [a for a in data["annotations"]
                               if not (isinstance(a, dict) and isinstance(a.get("image_id"), (int, str))
                                       and a["image_id"] in gone)]
    indent = 2 if "\n" in text.strip() else None  # keep a one-line file (as COCO's are) on one line
    return (json.dumps(data, indent=indent, ensure_ascii=False) + ("\n" if text.endswith("\n") else "")).encode()


# ----------------------------------------------------------------------------------------------
# YOLO


@dataclass
class YoloLayout(Layout):
    """The YOLO layout: photos under `images/`, labels under `labels/` (`labels/<key>.txt`)."""

    def _carrier(self, out, renamed, failed):
        dropped = {f"labels/{p.key}.txt" for p in self.listed if p.rel in failed and p.key}
        photos = {p.rel for p in self.listed}
        roots = _spellings(self.root)
        out_abs = os.path.abspath(out)

        def carry(rel: str, src: Path) -> Carried:
            if rel in dropped:
                return None
            if "/" not in rel and src.suffix.lower() in (".yaml", ".yml"):
                return yaml_moved(src, roots, out_abs)
            if "/" not in rel and src.suffix.lower() == ".txt":
                return list_edited(src, roots, out_abs, photos, renamed, failed)
            return COPY
        return carry


def _yolo(root: Path) -> YoloLayout | None:
    images, labels = root / "images", root / "labels"
    if not images.is_dir() or not labels.is_dir():
        return None
    keys = {image_name(p, labels) for p in list_files(labels, recursive=True)
            if p.suffix.lower() == ".txt" and p.name.lower() not in CLASS_FILES}
    photos = [Photo(p.relative_to(root).as_posix(), 0, image_name(p, images)) if keys
              else Photo(p.relative_to(root).as_posix(), -1, "") for p in list_images(images, recursive=True)]
    listed = _checked(root, photos, f"no image files under {images}")
    labelled = sum(1 for p in listed if p.key in keys)
    detail = f"{_count(len(listed), 'photo')}, {labelled:,} with a label file in labels/"
    return YoloLayout("yolo", root, [labels] if keys else [], listed, detail)


def _spellings(root: Path) -> tuple[str, ...]:
    """The absolute spellings of `root` an annotation may write (as given, and with links resolved)."""
    return tuple(dict.fromkeys((os.path.abspath(root), os.path.realpath(root))))




# ----------------------------------------------------------------------------------------------
# Pascal VOC


@dataclass
class VocLayout(Layout):
    """The Pascal VOC layout: `sets` the rels of the folders holding `JPEGImages/` and `Annotations/` ('' the
    source), deepest first."""

    sets: list[str] = field(default_factory=list)

    def split(self, rel: str) -> tuple[str, str]:
        """(set rel, path under it) of a file rel under the source; ('', rel) outside every set."""
        for s in self.sets:
            if not s or rel.startswith(s + "/"):
                return s, rel[len(s) + 1:] if s else rel
        return "", rel

    def _carrier(self, out, renamed, failed):
        ids: dict[str, set[str]] = {}  # set -> the ids (paths under JPEGImages/ without suffix) of failed photos
        xmls: dict[str, str] = {}  # an XML's rel -> its photo's rel
        for p in self.listed:
            s, sub = self.split(p.rel)
            photo_id = PurePosixPath(sub).relative_to("JPEGImages").with_suffix("").as_posix()
            if p.rel in failed:
                ids.setdefault(s, set()).add(photo_id)
            if p.labels >= 0:
                xmls[posixpath.join(s, "Annotations", photo_id + ".xml")] = p.rel

        def carry(rel: str, src: Path) -> Carried:
            s, sub = self.split(rel)
            top, _, rest = sub.partition("/")
            gone = ids.get(s, set())
            if rel in xmls and xmls[rel] in failed:
                return None
            if top.startswith("Segmentation") and PurePosixPath(rest).with_suffix("").as_posix() in gone:
                return None  # a failed photo's SegmentationClass / SegmentationObject mask
            if top == "ImageSets" and src.suffix.lower() == ".txt" and gone:
                return ids_dropped(src, gone)
            if rel in xmls and renamed(xmls[rel]) != xmls[rel]:
                return voc_renamed(src, xmls[rel], renamed(xmls[rel]))
            return COPY
        return carry


def _folders(root: Path, depth: int) -> list[Path]:
    """`root` and its sub-folders (hidden ones left out) up to `depth` levels down, shallowest first, sorted."""
    found, level = [root], [root]
    for _ in range(depth):
        level = sorted(Path(e.path) for f in level for e in os.scandir(f) if e.is_dir() and not is_hidden(Path(e)))
        found += level
    return found


def _voc(root: Path) -> VocLayout | None:
    sets = [p for p in _folders(root, 2) if (p / "JPEGImages").is_dir() and (p / "Annotations").is_dir()]
    if not sets:
        return None
    photos, labels = [], []
    for folder in sets:
        jpegs, notes = folder / "JPEGImages", folder / "Annotations"
        keys = {image_name(p, notes) for p in list_files(notes, recursive=True) if p.suffix.lower() == ".xml"}
        index = -1
        for p in list_images(jpegs, recursive=True):
            key, rel = image_name(p, jpegs), p.relative_to(root).as_posix()
            if key in keys and index < 0:
                labels.append(notes)
                index = len(labels) - 1
            photos.append(Photo(rel, index, key) if key in keys else Photo(rel, -1, ""))
    listed = _checked(root, photos, "no image files in JPEGImages/")
    rels = ["" if p == root else p.relative_to(root).as_posix() for p in sets]
    annotated = sum(1 for p in listed if p.labels >= 0)
    named = ", ".join(s or "." for s in rels)
    detail = (f"{_count(len(sets), 'set')} ({named}), {_count(len(listed), 'photo')}, {annotated:,} with an "
              "annotation")
    deepest = sorted(rels, key=lambda s: (-len(s.split("/")) if s else 0, s))
    return VocLayout("voc", root, labels, listed, detail, deepest)
