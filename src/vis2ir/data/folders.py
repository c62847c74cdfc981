"""Folder layouts of paired visible/infrared data (docs/design.md §8), found by their shape.

| layout    | files                                                   | official splits              |
|-----------|---------------------------------------------------------|------------------------------|
| paired    | `visible/**`, `infrared/**`, paired by relative path    | first folder if a split name |
| llvip     | `visible/{train,test}/*.jpg`, `infrared/{train,test}/`  | train, test                  |
| flir      | `JPEGImages/X_RGB.jpg` + `X_PreviewData.jpeg`           | `align_{train,validation}.txt` |
| m3fd      | `Vis/*.png`, `Ir/*.png`                                 | none                         |
| msrs      | `{train,test}/{vi,ir}/*.png`                            | train, test                  |
| kaist     | `setXX/V00Y/{visible,lwir}/I#####.jpg`                  | list files, else sets 00-05 / 06-11 |
| triptych  | any images, each `[visible | infrared | semantic]`      | first folder if a split name |

A sample's name is its path without suffix relative to the layout's image folder (`train/010001`,
`set00/V000/I01216`, `FLIR_00002`); its semantic map, when there is one, is `<root>/semantic/<name>.png`
(any image suffix; the folder name is `data.semantic_dir`), or `<root>/semantic/<bare name>.png` in a semantic
folder without the sample's sub-folders, unless another sample shares that bare name (`io.inputs.match_partners`,
the matcher of generate and evaluate too). List files `train.txt`, `val.txt`,
`test.txt` at the root (one name per line) give official splits to any layout; where list files
exist, samples they do not list are left out. Samples with no official split are split by a hash of
their name; a val part is carved from an official train split when the set has no val.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from vis2ir.data.errors import DataError
from vis2ir.errors import Vis2IRError
from vis2ir.io.boxes import BoxLabels
from vis2ir.data.images import Panel, close_panels, open_image, triptych_panels
from vis2ir.data.splits import assign_splits, split_alias
from vis2ir.io.images import IMAGE_SUFFIXES
from vis2ir.files import list_files
from vis2ir.io.inputs import AUTO_DIR, list_images, match_partners, missing_maps_help, skipped_note


@dataclass(frozen=True)
class Record:
    """One sample: its name and split, and where its panels are (files, or a row of a table)."""

    name: str
    split: str
    visible: str | None = None
    infrared: str | None = None
    semantic: str | None = None
    triptych: str | None = None
    table: str | None = None
    row: int | None = None


@dataclass
class Found:
    """What a layout holds: samples, and problems found pairing them (each names a file)."""

    layout: str
    root: Path
    records: list[Record]
    problems: list[str] = field(default_factory=list)
    skipped: str | None = None  # image files of formats the listings do not take (`io.inputs.skipped_note`)
    map_problems: dict[str, str] = field(default_factory=dict)  # name -> why its semantic map was not taken

    def no_map(self, record: Record, semantic_dir: Path) -> str:
        """One line: why `record` has no semantic map (naming its visible file and the semantic folder)."""
        return f"{record.visible}: {self.map_problems.get(record.name) or f'no semantic map in {semantic_dir}'}"


LAYOUT_NAMES = {"flir": "FLIR", "llvip": "LLVIP", "paired": "paired visible/infrared", "m3fd": "M3FD",
                "msrs": "MSRS", "kaist": "KAIST"}
PART_SEARCH_DEPTH = 3  # how many folders up a part of a layout looks for it (KAIST: setXX/V00Y/visible)


def _known_layout(root: Path) -> str | None:
    """The paired layout of folder `root` from its sub-folders and files, or None (triptychs aside)."""
    try:
        subdirs = {p.name for p in root.iterdir() if p.is_dir()}
    except OSError:
        return None
    if "JPEGImages" in subdirs and any(root.glob("align_*.txt")):
        return "flir"
    if {"visible", "infrared"} <= subdirs:
        splits = any(split_alias(p.name) for p in (root / "visible").iterdir() if p.is_dir())
        return "llvip" if splits else "paired"
    if {"Vis", "Ir"} <= subdirs:
        return "m3fd"
    if any((root / d / "vi").is_dir() and (root / d / "ir").is_dir() for d in subdirs):
        return "msrs"
    if any(re.fullmatch(r"set\d+", d) for d in subdirs):
        return "kaist"
    return None


def _is_part(top: Path, layout: str, first: str) -> bool:
    """Whether sub-folder `first` of a `layout` folder `top` is one of the layout's own folders."""
    if first in ("semantic", AUTO_DIR):
        return True
    return {"flir": first == "JPEGImages", "llvip": first in ("visible", "infrared"),
            "paired": first in ("visible", "infrared"), "m3fd": first in ("Vis", "Ir"),
            "msrs": (top / first / "vi").is_dir(), "kaist": bool(re.fullmatch(r"set\d+", first))}[layout]


def _part_of_layout(root: Path) -> DataError | None:
    """The error for a folder inside a known layout (`LLVIP/visible`, `MSRS/train/vi`), naming the layout's
    folder to give instead, or None."""
    root = root.resolve()
    for top in list(root.parents)[:PART_SEARCH_DEPTH]:
        layout = _known_layout(top)
        if layout is not None:
            part = root.relative_to(top)
            if _is_part(top, layout, part.parts[0]):
                whose = "its parent" if top == root.parent else "the layout's folder"
                return DataError(f"{root}: this is the {part.as_posix()} folder of the {LAYOUT_NAMES[layout]} "
                                 f"layout in {top}, not a data set of its own: give {whose}, data.source={top}")
    return None


def detect_layout(root: Path) -> str:
    """The layout of folder `root`, from its sub-folders and files. A folder inside a known layout (its
    `visible/` folder, a split of it) is refused with the folder to give instead, not read as triptychs."""
    layout = _known_layout(root)
    if layout is not None:
        return layout
    inside = _part_of_layout(root)
    if inside is not None:
        raise inside
    if _index(root):
        return "triptych"
    raise DataError(f"{root}: no images and no known layout (expected visible/ + infrared/, Vis/ + Ir/, "
                    "train/vi + train/ir, setXX/V00Y/visible + lwir, JPEGImages/ + align_*.txt, "
                    "or triptych images)")


def find_folder(root: Path, layout: str, semantic_dir: str, val_fraction: float, test_fraction: float) -> Found:
    """All samples of a folder layout with their splits and semantic maps, and the pairing problems."""
    problems: list[str] = []
    pairs = _PAIRERS[layout](root, problems)  # name -> (visible, infrared, official split) or triptych path
    if not pairs and not problems:
        raise DataError(f"{root}: no images found for layout {layout!r}")
    lists = _list_files(root, layout, problems)
    notes = []
    if lists:
        notes.append(unmatched_note(root, lists, pairs))
        pairs = {name: (*pair[:-1], lists[name]) for name, pair in pairs.items() if name in lists}
    names = sorted(pairs)
    splits = assign_splits(names, [pairs[n][-1] for n in names], val_fraction, test_fraction)
    maps = None
    if layout != "triptych" and (root / semantic_dir).is_dir():
        maps = match_partners({name: None for name in names}, root / semantic_dir, "semantic map", recursive=True)
    records = []
    for name, split in zip(names, splits):
        files = pairs[name]
        if layout == "triptych":
            records.append(Record(name, split, triptych=str(files[0])))
        else:
            sem = maps.found.get(name) if maps else None
            records.append(Record(name, split, visible=str(files[0]), infrared=str(files[1]),
                                  semantic=str(sem) if sem else None))
    other_formats: list[Path] = []
    list_images(root, recursive=True, skipped=other_formats)
    notes = "; ".join(n for n in [skipped_note(other_formats), *notes] if n) or None
    return Found(layout, root, records, problems, notes, dict(maps.ambiguous) if maps else {})


class FileReader:
    """Opens the panels of a folder record (lazily: headers only until decoded). With `boxes`
    (`data.semantic_source: boxes`), the semantic panel is drawn from the record's detection boxes at the
    visible image's size."""

    def __init__(self, semantic_dir: Path, boxes: BoxLabels | None = None):
        self.semantic_dir = semantic_dir
        self.boxes = boxes

    def open(self, record: Record, semantic: bool | None) -> dict[str, Panel]:
        """The record's panels; `semantic`: with the semantic map (None: when the record has one)."""
        if semantic is None:
            semantic = record.semantic is not None or record.triptych is not None
        if record.triptych is not None:
            panels = triptych_panels(open_image(record.triptych, record.triptych), record.triptych)
            return panels if semantic else {k: panels[k] for k in ("visible", "infrared")}
        files = [("visible", record.visible), ("infrared", record.infrared)]
        if semantic and self.boxes is not None:
            return self._with_boxes(record, files)
        if semantic:
            if record.semantic is None:
                raise DataError(f"{record.visible}: no semantic map (expected {self.semantic_dir}/"
                                f"{record.name}.png); {missing_maps_help(maps=self.semantic_dir, recursive=True)}")
            files.append(("semantic", record.semantic))
        panels: dict[str, Panel] = {}
        try:
            for kind, path in files:
                panels[kind] = Panel(open_image(path, path), path)
        except DataError:
            close_panels(panels)
            raise
        return panels

    def _with_boxes(self, record: Record, files: list) -> dict[str, Panel]:
        panels = self.open(record, False)
        try:
            drawn = self.boxes.draw_image(self.boxes.find(record.name), *panels["visible"].size)
        except Vis2IRError as err:  # a malformed annotation file or an unmapped category: named by the error
            close_panels(panels)
            raise DataError(str(err)) from None
        panels["semantic"] = Panel(drawn, f"{record.semantic} (boxes of {record.name})")
        return panels


# ----------------------------------------------------------------------------------------------
# One pairing function per layout: {name: (visible, infrared, official split)} and problems


def _pair_paired(root: Path, problems: list[str], vis: str = "visible", ir: str = "infrared") -> dict:
    pairs = _match(_index(root / vis), _index(root / ir), root / vis, root / ir, problems)
    return {name: (*files, split_alias(name.split("/")[0]) if "/" in name else None)
            for name, files in pairs.items()}


def _pair_m3fd(root: Path, problems: list[str]) -> dict:
    return _pair_paired(root, problems, "Vis", "Ir")


def _pair_msrs(root: Path, problems: list[str]) -> dict:
    pairs = {}
    for d in sorted(p for p in root.iterdir() if (p / "vi").is_dir()):
        found = _match(_index(d / "vi"), _index(d / "ir"), d / "vi", d / "ir", problems)
        pairs.update({f"{d.name}/{name}": (*files, split_alias(d.name)) for name, files in found.items()})
    return pairs


def _pair_kaist(root: Path, problems: list[str]) -> dict:
    pairs = {}
    for v in sorted(root.glob("set*/V*")):
        if not (v / "visible").is_dir():
            continue
        official = "train" if int(re.sub(r"\D", "", v.parent.name) or 0) <= 5 else "test"
        found = _match(_index(v / "visible"), _index(v / "lwir"), v / "visible", v / "lwir", problems)
        pairs.update({f"{v.parent.name}/{v.name}/{n}": (*files, official) for n, files in found.items()})
    return pairs


def _pair_flir(root: Path, problems: list[str]) -> dict:
    images = _index(root / "JPEGImages")
    vis = {k[: -len("_RGB")]: p for k, p in images.items() if k.endswith("_RGB")}
    ir = {k[: -len("_PreviewData")]: p for k, p in images.items() if k.endswith("_PreviewData")}
    pairs = _match(vis, ir, root / "JPEGImages", root / "JPEGImages", problems)
    return {name: (*files, None) for name, files in pairs.items()}


def _pair_triptych(root: Path, problems: list[str]) -> dict:
    return {name: (path, split_alias(name.split("/")[0]) if "/" in name else None)
            for name, path in _index(root).items()}


_PAIRERS = {"paired": _pair_paired, "llvip": _pair_paired, "m3fd": _pair_m3fd, "msrs": _pair_msrs,
            "kaist": _pair_kaist, "flir": _pair_flir, "triptych": _pair_triptych}


# ----------------------------------------------------------------------------------------------
# Helpers


def _index(folder: Path) -> dict[str, Path]:
    """Images under `folder` by name (relative path without suffix, '/'-separated); hidden files left out."""
    if not folder.is_dir():
        return {}
    out: dict[str, Path] = {}
    for path in list_images(folder, recursive=True):
        out.setdefault(path.relative_to(folder).with_suffix("").as_posix(), path)
    return out


def _match(vis: dict[str, Path], ir: dict[str, Path], vis_dir: Path, ir_dir: Path,
           problems: list[str]) -> dict[str, tuple[Path, Path]]:
    for name in sorted(vis.keys() - ir.keys()):
        problems.append(f"{vis[name]}: missing partner: no infrared image for it in {ir_dir}")
    for name in sorted(ir.keys() - vis.keys()):
        problems.append(f"{ir[name]}: missing partner: no visible image for it in {vis_dir}")
    return {name: (vis[name], ir[name]) for name in sorted(vis.keys() & ir.keys())}


def _list_files(root: Path, layout: str, problems: list[str]) -> dict[str, str]:
    """Official split per sample name from list files, or {} when the set has none. KAIST keeps its
    lists at the root or in `imageSets/` (e.g. `train-all-02.txt`); all lists of one split are joined.
    A name listed for two splits (a train/test leak) is a problem, named with both list files, and is left out."""
    if layout == "flir":
        files = [(root / "align_train.txt", "train"), (root / "align_validation.txt", "test")]
    elif layout == "kaist":
        found = sorted([*list_files(root, "*.txt"), *list_files(root, "[iI]mage[sS]ets/*.txt")])
        files = [(txt, s) for txt in found for s in ("train", "val", "test") if s in txt.stem.lower()]
    else:
        files = [(root / f"{split}.txt", split) for split in ("train", "val", "test")]
    out: dict[str, str] = {}
    where: dict[str, Path] = {}  # the list file that gave each name its split
    twice: dict[str, Path] = {}  # names listed for another split too, and that other list file
    for txt, split in files:
        if txt.is_file():
            for name in _read_list(txt, layout):
                if name not in out:
                    out[name], where[name] = split, txt
                elif out[name] != split and name not in twice:
                    twice[name] = txt
    for name, txt in twice.items():
        del out[name]
        problems.append(f"sample name {name!r} is listed in both {where[name]} and {txt}: a sample belongs to one "
                        "split (in two, the test scores would measure training samples); remove it from one of "
                        "these list files")
    return out


def _read_list(txt: Path, layout: str) -> list[str]:
    """The sample names of a list file: one a line, the whole line (names may hold spaces), surrounding
    blanks and empty lines left out; bytes that are not UTF-8 read as `os.listdir` reads such file names.
    FLIR's and KAIST's own lists (names without spaces) are read word by word, as they were published."""
    try:
        text = txt.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as err:
        raise DataError(f"{txt}: cannot read the list file ({err.strerror or err})") from None
    lines = text.split() if layout in ("flir", "kaist") else text.splitlines()
    return [_list_name(line, layout) for line in lines if line.strip()]


def unmatched_note(root: Path, lists: dict[str, str], names) -> str | None:
    """One line naming list-file names that match no sample found (a typo, a file not there), or None."""
    missing = sorted(set(lists) - set(names))
    if not missing:
        return None
    return (f"{len(missing)} names in the list files of {root} match no sample (e.g. {missing[0]!r}: no such pair of "
            "images); they are left out")


def _list_name(line: str, layout: str) -> str:
    name = line.strip().removeprefix("./")
    name = name.rsplit(".", 1)[0] if name.lower().endswith(IMAGE_SUFFIXES) else name
    if layout == "kaist":
        name = re.sub(r"^(set\d+)[_/](V\d+)[_/](?:visible/|lwir/)?", r"\1/\2/", name)
    if layout == "flir":
        name = re.sub(r"_(RGB|PreviewData)$", "", name.rsplit("/", 1)[-1])
    return name
