"""Listing inputs: image files under one rule for hidden and system files, and the items of a folder run.

Hidden files are skipped by every listing of the package (data layouts, list files, tables,
`generate`, `evaluate` and `segment` inputs): names starting with '.' (macOS `._name` sidecars,
`.DS_Store`), `Thumbs.db`, `desktop.ini`, and anything inside a folder such as `.thumbnails/` or
`__MACOSX/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vis2ir.errors import Vis2IRError
from vis2ir.files import safe_join
from vis2ir.io.images import IMAGE_SUFFIXES

SYSTEM_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})
AUTO_DIR = "semantic_auto"  # the cache of `--semantic auto` / `data.semantic_source: auto`, beside the data


def is_hidden(path: Path, root: Path | None = None) -> bool:
    """Whether `path` (or a folder between `root` and it) is a hidden or system file."""
    parts = path.relative_to(root).parts if root is not None else (path.name,)
    return any(p.startswith(".") or p.lower() in SYSTEM_NAMES for p in parts)


def list_files(folder: Path, pattern: str = "*", recursive: bool = False) -> list[Path]:
    """Files in `folder` matching the glob `pattern` (under sub-folders too with `recursive`), hidden
    ones left out, sorted."""
    found = folder.rglob(pattern) if recursive else folder.glob(pattern)
    return sorted(p for p in found if not is_hidden(p, folder) and p.is_file())


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files (`IMAGE_SUFFIXES`) in `folder` (and its sub-folders with `recursive`), sorted."""
    return [p for p in list_files(folder, recursive=recursive) if p.suffix.lower() in IMAGE_SUFFIXES]


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

    def raise_failures(self, total: int) -> None:
        """One error listing the first failures, when there are any (`total`: this process's inputs)."""
        if self.failed:
            listed = "; ".join(f"{k} ({v})" for k, v in list(self.failed.items())[:5])
            more = f"; and {len(self.failed) - 5} more" if len(self.failed) > 5 else ""
            raise Vis2IRError(f"{len(self.failed)} of {total} inputs failed: {listed}{more}")


def list_inputs(input_path: str | Path, semantic: str | Path | None = None) -> list[Item]:
    """The items of a run: one file or a folder's images, each matched to a semantic map by name
    (`semantic="auto"`: the map cached in `semantic_auto/` beside the inputs, made when missing)."""
    src = Path(input_path)
    if not src.exists():
        raise Vis2IRError(f"--input {src}: no such file or folder")
    paths = list_images(src) if src.is_dir() else [src]
    if not paths:
        raise Vis2IRError(f"--input {src}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    names: dict[str, Path] = {}
    for p in paths:
        if p.stem in names:
            raise Vis2IRError(f"--input: {names[p.stem].name} and {p.name} would both write {p.stem}.png")
        names[p.stem] = p
    items = [Item(p.stem, p) for p in paths]
    if semantic is None:
        return items
    sem = Path(semantic)
    if str(semantic) == "auto":  # maps cached beside the inputs; the runner makes the missing ones
        cache = (src if src.is_dir() else src.parent) / AUTO_DIR
        for it in items:
            it.semantic = map_path(cache, it.name)
        return items
    if not sem.exists():
        raise Vis2IRError(f"--semantic {sem}: no such file or folder")
    if sem.is_file():
        if src.is_dir():
            raise Vis2IRError(f"--semantic {sem}: a single file goes with a single --input file; pass a folder "
                              "of maps named like the inputs")
        items[0].semantic = sem
        return items
    maps: dict[str, Path] = {}
    for p in list_images(sem):
        maps.setdefault(p.stem, p)
    for it in items:
        it.semantic = sem / it.visible.name if (sem / it.visible.name).is_file() else maps.get(it.name)
        if it.semantic is None:
            it.problem = f"no semantic map named {it.name}.* in {sem}"
    return items
