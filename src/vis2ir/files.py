"""Writing files atomically and durably, and keeping names that come from data inside their folder.

Torch-free on purpose: the config module uses it before torch is imported.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from vis2ir.errors import Vis2IRError


def temp_path(path: str | Path, kind: str = "tmp") -> Path:
    """A temporary name beside `path` that only this process uses: `.<name>.<kind>-<pid>-<random>`
    (two runs sharing a folder never take, or delete, each other's temporary files)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def fsync(path: str | Path) -> None:
    """Flush a file's or a folder's data and metadata to the disk (folders: no-op where the OS has none)."""
    directory = Path(path).is_dir()
    if directory and os.name == "nt":  # Windows cannot open a folder for fsync
        return
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Create `path` atomically and durably: `write(tmp)` fills a temporary file beside it (named by
    `temp_path`), which is fsynced, renamed over `path` (`os.replace`), and the folder fsynced; a failed
    write leaves the old file (if any) and no temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync(path.parent)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | Path, data: dict) -> Path:
    """Write `data` as indented JSON, atomically."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Names from data


def name_problem(name) -> str | None:
    """Why `name` (a sample's name from a table, list or folder) cannot name an output file, or None.

    A name is a relative path: '/'-separated parts (sub-folders), none empty, '.' or '..', no
    backslash or NUL character, not absolute."""
    if not isinstance(name, str) or not name:
        return "is empty"
    if "\x00" in name:
        return "holds a NUL character"
    if "\\" in name:
        return "holds a backslash"
    if PurePosixPath(name).is_absolute():
        return "is an absolute path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "has an empty, '.' or '..' part"
    return None


def check_name(name, where: str = "sample name") -> str:
    """`name` when `name_problem` finds nothing, else a one-line `Vis2IRError` naming `where`."""
    problem = name_problem(name)
    if problem:
        raise Vis2IRError(f"{where} {name!r} {problem}: a name must be a relative path inside the output "
                          "folder (parts separated by '/', none empty, '.' or '..')")
    return name


def safe_join(root: str | Path, name: str, suffix: str = "") -> Path:
    """`root/<name><suffix>`, checked to stay inside `root` (the name is checked with `check_name`,
    then the joined path, normalised, must lie under `root`); else a one-line `Vis2IRError`."""
    check_name(name)
    root = Path(root)
    path = root / f"{name}{suffix}"
    top, full = os.path.abspath(root), os.path.abspath(path)
    if os.path.commonpath([top, full]) != top or full == top:
        raise Vis2IRError(f"sample name {name!r}: {path} would be written outside {root}")
    return path
