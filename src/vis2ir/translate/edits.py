"""Editing the annotation files `vis2ir translate` carries into its output (`layouts.Layout.carry_over`): each
function takes a source file and returns what the output gets: new content (bytes), `COPY` (the file unchanged,
streamed) or None (left out). Only what names a photo changes: its suffix (PNG output), an absolute path into the
source (moved to the output), a failed photo's lines (dropped); every other byte stays. Torch-free."""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)


class Copied:
    """`carry_over`'s mark for a file copied unchanged (streamed, not read into memory)."""


COPY = Copied()
Carried = bytes | Copied | None  # what a carried file becomes: new content, unchanged, or left out (None)


def suffix_swap(text: str, rel: str, new: str) -> str | None:
    """`text` (a photo's name as an annotation writes it) with photo `rel`'s suffix changed to that of `new`
    (its output rel); None when `text` does not end with the suffix. ValueError when `new` is not `rel` with
    another suffix."""
    old, now = PurePosixPath(rel), PurePosixPath(new)
    if old.with_suffix("") != now.with_suffix(""):
        raise ValueError(f"renamed({rel!r}) = {new!r}: only the suffix of a photo's path may change")
    if not old.suffix or not text.lower().endswith(old.suffix.lower()):
        return None
    return text[:len(text) - len(old.suffix)] + now.suffix


def moved_rel(path: str, roots: tuple[str, ...]) -> str | None:
    """The rel under the source of absolute `path` ('' the source itself), None when it is not in it."""
    path = posixpath.normpath(path)
    for r in roots:
        if path == r:
            return ""
        if path.startswith(r.rstrip("/") + "/"):
            return path[len(r.rstrip("/")) + 1:]
    return None


YAML_VALUE = re.compile(r"(?P<head>\s*(?:[\w.-]+\s*:|-)\s*)(?P<q>['\"]?)(?P<value>/[^'\"#\r\n]*?)(?P=q)"
                         r"(?P<tail>\s*(?:#.*)?)")


YAML_ROOT = re.compile(r"(?P<head>path\s*:\s*)(?P<q>['\"]?)(?P<value>[^'\"#\r\n/\s][^'\"#\r\n]*?)(?P=q)"
                        r"(?P<tail>\s*(?:#.*)?)")  # a top-level relative `path:` (Ultralytics: under its datasets dir)


def yaml_moved(src: Path, roots: tuple[str, ...], out: str) -> Carried:
    """A YAML file (YOLO's data.yaml) with each absolute path in the source (`path: /data/set`) moved to `out`, and a
    top-level relative `path:` (which Ultralytics resolves under its own datasets folder, where the photos would be
    found) set to `out`: one line edited per path, the rest left as it is."""
    lines = src.read_bytes().decode("utf-8", "surrogateescape").splitlines(keepends=True)
    changed = False
    for n, line in enumerate(lines):
        body = line.rstrip("\r\n")
        if (root := YAML_ROOT.fullmatch(body)) is not None:
            lines[n] = f"{root['head']}{root['q']}{out}{root['q']}{root['tail']}{line[len(body):]}"
            changed = True
            continue
        m = YAML_VALUE.fullmatch(body)
        rel = moved_rel(m["value"].strip(), roots) if m else None
        if rel is not None:
            value = posixpath.join(out, rel) if rel else out
            lines[n] = f"{m['head']}{m['q']}{value}{m['q']}{m['tail']}{line[len(body):]}"
            changed = True
    return "".join(lines).encode("utf-8", "surrogateescape") if changed else COPY


def list_edited(src: Path, roots: tuple[str, ...], out: str, photos: set[str], renamed: Callable[[str], str],
                 failed: set[str]) -> Carried:
    """A list file (`train.txt`: a photo path a line, relative to the source or absolute) for the output: photo
    paths renamed, absolute ones moved to `out`, failed photos' lines dropped. COPY when it lists no photo or
    nothing changes."""
    lines = src.read_bytes().decode("utf-8", "surrogateescape").splitlines(keepends=True)
    kept, listed = [], False
    for line in lines:
        body = line.rstrip("\r\n")
        m = re.fullmatch(r"(\ufeff?\s*)(.*?)(\s*)", body)
        path = m[2]
        absolute = path.startswith("/")
        rel = moved_rel(path, roots) if absolute else posixpath.normpath(path) if path else None
        if rel not in photos:
            if absolute and rel is not None:
                path = posixpath.join(out, rel) if rel else out
            kept.append(f"{m[1]}{path}{m[3]}{line[len(body):]}")
            continue
        listed = True
        if rel in failed:
            continue
        new = renamed(rel)
        path = posixpath.join(out, new) if absolute else (suffix_swap(path, rel, new) or path)
        kept.append(f"{m[1]}{path}{m[3]}{line[len(body):]}")
    if not listed or kept == lines:
        return COPY
    return "".join(kept).encode("utf-8", "surrogateescape")


FILENAME = re.compile(rb"(<filename>)([^<]*)(</filename>)")


def voc_renamed(src: Path, rel: str, new: str) -> Carried:
    """A VOC XML with its `<filename>` given photo `new`'s suffix; the rest of the file byte for byte."""
    data = src.read_bytes()
    m = FILENAME.search(data)
    if m is None:
        return COPY
    text = m[2].decode("utf-8", "surrogateescape")
    stripped = text.rstrip()
    name = suffix_swap(stripped, rel, new)
    if name is None:
        log.debug("%s: <filename>%s</filename> does not end with the photo's suffix; left as it is", src, text)
        return COPY
    inner = (name + text[len(stripped):]).encode("utf-8", "surrogateescape")
    return data[:m.start(2)] + inner + data[m.end(2):]


def ids_dropped(src: Path, ids: set[str]) -> Carried:
    """An ImageSets list without the lines whose first token is one of `ids` (COPY when none is)."""
    lines = src.read_bytes().decode("utf-8", "surrogateescape").splitlines(keepends=True)
    kept = [line for line in lines if not (line.split() and line.split()[0] in ids)]
    return COPY if len(kept) == len(lines) else "".join(kept).encode("utf-8", "surrogateescape")
