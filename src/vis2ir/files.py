"""Writing files atomically and durably, keeping names that come from data inside their folder, and listing
the files of a folder without the hidden and system ones.

Torch-free on purpose: the config module uses it before torch is imported.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
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


def umask() -> int:
    """This process's umask (Linux: read from /proc, which leaves it alone for other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def ordinary_mode(folder: bool = False) -> int:
    """The permissions an ordinary new file (0o666) or folder (0o777) gets under this process's umask:
    0o644 / 0o755 with umask 022. Writers that stage in temporary files (safetensors writes them 0o600)
    give their files this mode, so a teammate or a service account can read what was written."""
    return (0o777 if folder else 0o666) & ~umask()


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Create `path` atomically and durably: `write(tmp)` fills a temporary file beside it (named by
    `temp_path`), which gets an ordinary file's permissions (`ordinary_mode`), is fsynced, renamed over
    `path` (`os.replace`), and the folder fsynced; a failed write leaves the old file (if any) and no
    temporary file. A full disk or an unwritable folder is a one-line `Vis2IRError` (`write_error`)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.chmod(tmp, ordinary_mode())
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    except Exception as err:
        if (failed := io_error(err)) is None:
            raise
        raise write_error(path.parent, failed, what=path.name) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def mib(n: float) -> str:
    """`n` bytes in MiB, for messages."""
    return f"{n / 2**20:,.1f} MiB"


class DiskFull(Vis2IRError):
    """A write failed because the disk (or the user's quota) is full: a folder run stops at the first one,
    since every later write would fail alike."""


# How the libraries that write our files report an OS-level write failure without raising `OSError`:
# safetensors' Rust writer ("I/O error: No space left on device (os error 28)") and torch.save's zip writer
# ("[enforce fail at inline_container.cc] . unexpected pos …", "PytorchStreamWriter failed writing file …").
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")
_TORCH_WRITE_FAILED = ("unexpected pos", "PytorchStreamWriter failed writing", "file write failed")


def io_error(err: BaseException) -> OSError | None:
    """`err` as the `OSError` it stands for when it is a failed write: an `OSError` itself, a safetensors error
    carrying an OS error code, or torch.save's zip-writer failure (`errno.EIO`, the OS's code being lost);
    None for anything else (a bug, which must stay a traceback)."""
    if isinstance(err, OSError):
        return err
    text = str(err)
    code = _OS_ERROR_CODE.search(text)
    if code and type(err).__name__ == "SafetensorError":
        return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
    if isinstance(err, RuntimeError) and any(part in text for part in _TORCH_WRITE_FAILED):
        return OSError(errno.EIO, "the write failed (torch.save could not write the whole file)")
    return None


def write_error(folder: str | Path, err: OSError, what: str = "", needed: int | None = None) -> Vis2IRError:
    """A one-line `Vis2IRError` for an `OSError` met writing into `folder`: a full disk (`DiskFull`: how much
    was `needed` in bytes, when known, and how much is free; also when the OS's code was lost, `io_error`, and
    the disk has less than `needed`, or nothing, free), a folder that is not writable, or the OS's reason."""
    folder = Path(folder)
    into = f" ({what})" if what else ""
    try:
        free = shutil.disk_usage(_existing(folder)).free
    except OSError:
        free = None
    full = err.errno in (errno.ENOSPC, errno.EDQUOT) or (
        err.errno == errno.EIO and free is not None and (free == 0 or (needed is not None and free < needed)))
    if full:
        need = f"needs about {mib(needed)}, " if needed else ""
        return DiskFull(f"{folder}: the disk is full, nothing written{into} ({need}"
                        f"{'unknown' if free is None else mib(free)} free); free some space or write to another "
                        "folder")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return Vis2IRError(f"{folder}: not writable ({err.strerror}), nothing written{into}; choose a folder "
                           "you can write to, or change its permissions")
    return Vis2IRError(f"{folder}: could not write{into}: {err.strerror or err}")


def _existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_writable(path: str | Path, what: str, file: bool = False) -> Path:
    """Refuse, in one line naming `what` (the setting or option), an output that cannot be written:
    `path` is a folder to write into, or a file to write (with `file`, or one that exists). The nearest existing
    folder on the way must be a writable folder. Call it before anything slow (a model) loads.
    Returns `path`. Creates nothing."""
    path = Path(path).expanduser()
    existing = _existing(path.parent if file or path.is_file() else path)  # a file to replace: its folder
    if file and path.is_dir():
        raise Vis2IRError(f"{what} {path}: is a folder, expected a file name to write")
    if not existing.is_dir():
        raise Vis2IRError(f"{what} {path}: {existing} is a file, not a folder; choose another output")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise Vis2IRError(f"{what} {path}: {existing} is not writable (read-only folder or disk), nothing "
                          "written; choose a folder you can write to, or change its permissions")
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` atomically, in UTF-8 whatever the locale; names read from a folder that are not UTF-8 (held
    as surrogate escapes, as `os.listdir` gives them) are written back as the bytes they were."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape"))


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


# ----------------------------------------------------------------------------------------------
# Listing

SYSTEM_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})  # files an OS leaves beside the data


def is_hidden(path: Path, root: Path | None = None) -> bool:
    """Whether `path` (or a folder between `root` and it) is a hidden or system file."""
    parts = path.relative_to(root).parts if root is not None else (path.name,)
    return any(p.startswith(".") or p.lower() in SYSTEM_NAMES for p in parts)


def list_files(folder: Path, pattern: str = "*", recursive: bool = False) -> list[Path]:
    """Files in `folder` matching the glob `pattern` (under sub-folders too with `recursive`), hidden
    ones left out, sorted."""
    found = folder.rglob(pattern) if recursive else folder.glob(pattern)
    return sorted(p for p in found if not is_hidden(p, folder) and p.is_file())
