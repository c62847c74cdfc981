"""Listing inputs: image files under one rule for hidden and system files, and the items of a folder run.

Hidden files are skipped by every listing of the package (data layouts, list files, tables,
`generate`, `evaluate` and `segment` inputs): names starting with '.' (macOS `._name` sidecars,
`.DS_Store`), `Thumbs.db`, `desktop.ini`, and anything inside a folder such as `.thumbnails/` or
`__MACOSX/`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from vis2ir.errors import Vis2IRError
from vis2ir.files import list_files, safe_join
from vis2ir.io.images import IMAGE_SUFFIXES, other_image_suffixes

log = logging.getLogger(__name__)

AUTO_DIR = "semantic_auto"  # the cache of `--semantic auto` / `data.semantic_source: auto`, beside the data


def missing_maps_help(images: str | Path | None = None, maps: str | Path | None = None, *,
                      auto: str = "data.semantic_source=auto", trained_mode: str | None = None,
                      recursive: bool = False) -> str:
    """The ways out of missing semantic maps, ending every 'no semantic maps' message: make them
    with `vis2ir segment` (from `images` into `maps`), have them made on the fly (`auto`: the setting or
    flag that does it), draw them from detection boxes (the same kind: setting or flag), or go without (`model.semantic.mode=none`; a checkpoint trained with
    `trained_mode` keeps it, so then a model trained without maps)."""
    segment = f"vis2ir segment --input {images or 'IMAGES'} --out {maps or 'MAPS'}" + (" --recursive" * recursive)
    if trained_mode is not None:
        none = (f"use a model trained with model.semantic.mode=none (this checkpoint was trained with "
                f"model.semantic.mode={trained_mode}, which needs them)")
    else:
        none = ("set model.semantic.mode=none (no semantic conditioning; a checkpoint keeps the mode it was "
                "trained with)")
    verb = "pass" if auto.startswith("--") else "set"
    boxes = "--boxes PATH" if auto.startswith("--") else "data.semantic_source=boxes data.boxes=PATH"
    return (f"make them with `{segment}`, or {verb} {auto} (made by a panoptic segmenter and cached on first use), "
            f"or draw them from detection boxes ({boxes}: YOLO, VOC, KAIST or COCO), or {none}")


def printable(text: str) -> str:
    """`text` with the surrogate escapes of a file name that is not UTF-8 (as `os.listdir` gives them: the
    byte 0xE9 of a Latin-1 `café` is '\\udce9') shown as `\\xe9`: for messages, reports and figures, which
    cannot write surrogates. File paths keep the name itself: it opens and writes the file of those bytes."""
    if not any("\udc80" <= ch <= "\udcff" for ch in text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def list_images(folder: Path, recursive: bool = False, skipped: list[Path] | None = None) -> list[Path]:
    """Image files (`IMAGE_SUFFIXES`) in `folder` (and its sub-folders with `recursive`), sorted; files of
    other formats Pillow opens are added to `skipped` when given."""
    files = list_files(folder, recursive=recursive)
    if skipped is not None:
        others = other_image_suffixes()
        skipped += [p for p in files if p.suffix.lower() in others]
    return [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]


def skipped_note(skipped: list[Path]) -> str | None:
    """One line naming image files of formats the listings do not take, or None when there are none."""
    if not skipped:
        return None
    kinds = ", ".join(sorted({p.suffix.lower() for p in skipped}))
    return (f"{len(skipped)} image files of formats vis2ir does not read ({kinds}) are skipped, e.g. {skipped[0]}; "
            f"convert them to PNG to use them (read: {' '.join(IMAGE_SUFFIXES)})")


def _log_skipped(src: Path, skipped: list[Path]) -> None:
    note = skipped_note(skipped)
    if note:
        log.warning("--input %s: %s", src, note)


def image_name(path: Path, root: Path) -> str:
    """A listed image's name: its path under `root` without suffix, '/'-separated (`train/010001`)."""
    return path.relative_to(root).with_suffix("").as_posix()


@dataclass
class Partners:
    """What `match_partners` found in a folder: the file that goes with each name, the names with none
    (`missing`), and those with more than one candidate (`ambiguous`: name → why)."""

    folder: Path
    what: str
    found: dict[str, Path] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    ambiguous: dict[str, str] = field(default_factory=dict)
    unmatched: list[Path] = field(default_factory=list)  # the folder's images that go with no name
    unreadable: dict[str, Path] = field(default_factory=dict)  # name -> a file of a format not read (x.heic)

    @cached_property
    def _missing(self) -> frozenset[str]:
        """`missing` as a set, for `problem` (one look-up per name of a run of any size, not a list search)."""
        return frozenset(self.missing)

    def problem(self, name: str) -> str | None:
        """Why `name` has no partner (one line naming the folder), or None when it has one."""
        if name in self._missing:
            if name in self.unreadable:
                return (f"its {self.what} {self.unreadable[name]} is of a format vis2ir does not read; convert it "
                        f"to PNG (read: {' '.join(IMAGE_SUFFIXES)})")
            return f"no {self.what} named {name}.* in {self.folder}"
        return self.ambiguous.get(name)


def match_partners(names: dict[str, Path | None], folder: Path, what: str, recursive: bool = False) -> Partners:
    """The image in `folder` that goes with each name of a run (`names`: name → its own file or None; a
    name is a relative path without suffix, as `image_name` makes it): the image at the same relative
    path with any suffix of `IMAGE_SUFFIXES` (`sub/x` ↔ `folder/sub/x.png`; of several, the one with the
    name's own suffix). When `folder` has no such sub-folder (a flat folder), a name in a sub-folder
    falls back to its bare name (`sub/x` ↔ `folder/x.*`) unless another name of the run shares that bare
    name (ambiguous). `recursive`: `folder`'s sub-folders are searched too (the names come from a
    recursive listing). `what` names the partners in the problems ("semantic map"). Every matcher of
    the package (generate's `--semantic` and `--truth`, evaluate's `--pred` and `--semantic`) goes
    through here."""
    index: dict[str, list[Path]] = {}
    others: list[Path] = []
    for p in list_images(folder, recursive=recursive, skipped=others):
        index.setdefault(image_name(p, folder), []).append(p)
    bare: dict[str, list[str]] = {}  # bare name -> the names that share it (one pass: no search per name)
    for n in names:
        bare.setdefault(n.rsplit("/", 1)[-1], []).append(n)
    for sharing in bare.values():
        sharing.sort()
    out = Partners(folder, what)
    for name, own in names.items():
        key = name
        if key not in index and "/" in name and not (folder / name).parent.is_dir():  # flat, for this name
            key = name.rsplit("/", 1)[-1]
            if key in index and len(bare[key]) > 1:
                sharing = bare[key]
                listed = ", ".join(sharing[:3]) + (", ..." if len(sharing) > 3 else "")
                out.ambiguous[name] = (f"no {what} named {name}.* in {folder}, and {key}.* there would go with "
                                       f"{len(sharing)} inputs ({listed}): give {folder} the sub-folders of the inputs")
                continue
        candidates = index.get(key, [])
        same = [p for p in candidates if own is not None and p.suffix.lower() == own.suffix.lower()]
        if len(candidates) == 1 or len(same) == 1:
            out.found[name] = (same or candidates)[0]
        elif candidates:
            out.ambiguous[name] = (f"several {what}s named {key}.* in {folder} "
                                   f"({', '.join(p.name for p in candidates)}): keep one")
        else:
            out.missing.append(name)
    used = set(out.found.values())
    out.unmatched = [p for paths in index.values() for p in paths if p not in used]
    other_names = {image_name(p, folder): p for p in others}
    out.unreadable = {n: other_names[n] for n in out.missing if n in other_names}
    return out


def map_path(root: Path, name: str) -> Path:
    """Where the colour map of sample `name` goes under `root` (a name may hold '/': sub-folders; it
    must stay inside `root`: `files.safe_join`)."""
    return safe_join(root, name, ".png")


# ----------------------------------------------------------------------------------------------
# The items of a folder run (`generate`, `visualize`, `segment`)


@dataclass
class Item:
    """One input image, its semantic map and its output name."""

    name: str
    visible: Path
    semantic: Path | None = None
    problem: str | None = None  # why it cannot run (found while listing)


@dataclass
class Summary:
    """What a folder run did: names done, skipped (outputs already there) and failed (with why)."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def raise_failures(self, total: int, hint: str | None = None) -> None:
        """One error listing the first failures, when there are any (`total`: this process's inputs;
        `hint`: what to do, said once at the end)."""
        if self.failed:
            listed = "; ".join(f"{k} ({v})" for k, v in list(self.failed.items())[:5])
            more = f"; and {len(self.failed) - 5} more" if len(self.failed) > 5 else ""
            raise Vis2IRError(f"{len(self.failed)} of {total} inputs failed: {listed}{more}"
                              + (f"; {hint}" if hint else ""))


def auto_cache(input_path: str | Path) -> Path:
    """Where `--semantic auto` caches the maps of an input file or folder: `semantic_auto/` beside them."""
    src = Path(input_path)
    return (src if src.is_dir() else src.parent) / AUTO_DIR


def list_inputs(input_path: str | Path, semantic: str | Path | None = None, recursive: bool = False,
                exclude: tuple[str | Path, ...] = ()) -> list[Item]:
    """The items of a run: one file or a folder's images, each matched to a semantic map by name
    (`match_partners`; a missing or ambiguous map is the item's `problem`); `semantic="auto"`: the map
    cached in `semantic_auto/` beside the inputs, made when missing.

    With `recursive` the images of sub-folders are items too, named by their relative path without
    suffix (`train/010001`: outputs mirror the sub-folders), and maps are looked up under the same
    relative names (or by bare name in a flat folder of maps); the `semantic_auto/` cache and the
    folders in `exclude` (a run's output folder inside its input) are left out."""
    src = Path(input_path)
    if not src.exists():
        raise Vis2IRError(f"--input {src}: no such file or folder")
    skipped: list[Path] = []
    paths = _input_images(src, recursive, exclude, skipped) if src.is_dir() else [src]
    _log_skipped(src, skipped)
    if not paths:
        raise Vis2IRError(f"--input {src}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder"
                          + ("" if recursive or not any(p.is_dir() for p in src.iterdir()) else
                             " (it has sub-folders: --recursive takes their images too)"))
    names: dict[str, Path] = {}
    for p in paths:
        name = image_name(p, src) if recursive and src.is_dir() else p.stem
        if name in names:
            raise Vis2IRError(f"--input: {names[name]} and {p} would both write {name}.png")
        names[name] = p
    items = [Item(name, p) for name, p in names.items()]
    if semantic is None:
        return items
    if str(semantic) == "auto":  # maps cached beside the inputs; the runner makes the missing ones
        for it in items:
            it.semantic = map_path(auto_cache(src), it.name)
        return items
    partners = item_partners(items, src, semantic, "--semantic", "semantic map", recursive)
    for it in items:
        it.semantic, it.problem = partners.found.get(it.name), partners.problem(it.name)
    return items


def item_partners(items: list[Item], src: Path, other: str | Path, option: str, what: str,
                  recursive: bool = False) -> Partners:
    """The files of option `other` (a file, or a folder of files named like the inputs: `match_partners`)
    that go with the `items` of `--input src`. A single file goes with a single input file; `other`
    missing, or one file for a folder of inputs, is a `Vis2IRError` naming `option`."""
    other = Path(other)
    if not other.exists():
        raise Vis2IRError(f"{option} {other}: no such file or folder")
    if other.is_file():
        if src.is_dir():
            raise Vis2IRError(f"{option} {other}: a single file goes with a single --input file; pass a folder "
                              f"of {what}s named like the inputs")
        return Partners(other.parent, what, found={items[0].name: other})
    return match_partners({it.name: it.visible for it in items}, other, what, recursive)


def _input_images(src: Path, recursive: bool, exclude, skipped: list[Path]) -> list[Path]:
    """The images of folder `src` (and its sub-folders), without the auto-map cache and `exclude`."""
    left_out = [Path(e).resolve() for e in exclude] + [(src / AUTO_DIR).resolve()]
    found = list_images(src, recursive=recursive, skipped=skipped)
    return [p for p in found if not any(p.resolve().is_relative_to(d) for d in left_out)]
