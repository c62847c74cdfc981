"""What a translation has done, kept under `OUT/.vis2ir/` so that a killed run continues where it stopped.

- `manifest-rank<R>-of<W>.jsonl`: one line per photo a rank finished, written (and fsynced) after its image
  was renamed into place: `{"input", "output", "seed", "model", "seconds"}`, or `{"input", "error"}` for a photo
  that failed (tried again by the next run). A photo is done when any manifest has a line without error for it;
  a line cut by a kill is ignored (its image, renamed or not, is made again, identically).
- `settings.json`: the settings the output was started with (model identity, sampling, output format), recorded once
  the model has loaded; a run with other settings is refused in one line, so that one data set never mixes two
  models' images. Each manifest line carries their digest.
- `finished.json` and the data-set card (`README.md`, or `TRANSLATION.md` when the source has a README), written
  once every photo is accounted for.
Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from pathlib import Path

from vis2ir.config.schema import flatten
from vis2ir.errors import Vis2IRError
from vis2ir.files import fsync, temp_path, write_json, write_text

log = logging.getLogger(__name__)

STATE = ".vis2ir"  # the run's own files, under --out (hidden: the data set's readers skip it)


def state_dir(out: Path) -> Path:
    """Where a translation keeps its own files: `out/.vis2ir`."""
    return Path(out) / STATE


class Manifest:
    """One rank's manifest, opened for appending (a line cut by a kill is cut off first)."""

    def __init__(self, out: Path, rank: int, world: int):
        self.path = state_dir(out) / f"manifest-rank{rank:05d}-of{world:05d}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):  # the last line was cut: drop it
                with open(self.path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self._file = open(self.path, "a", encoding="utf-8")

    def append(self, entry: dict) -> None:
        """Write one line and make it durable before returning."""
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def read_manifests(out: Path) -> tuple[set[str], dict[str, str]]:
    """Every manifest under `out` (any rank count) → (the inputs done, the inputs failed → why). A later success
    clears an earlier failure; lines that do not parse (cut by a kill) are skipped. Only names are kept."""
    done: set[str] = set()
    failed: dict[str, str] = {}
    for path in sorted(state_dir(out).glob("manifest-rank*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    name = entry["input"]
                except (ValueError, KeyError, TypeError):
                    continue
                if entry.get("error"):
                    if name not in done:
                        failed[name] = entry["error"]
                else:
                    done.add(name)
                    failed.pop(name, None)
    return done, failed


TEMPORARY = re.compile(r"\..+\.tmp-\d+-[0-9a-f]{8}")  # `files.temp_path`'s names: a write in progress or abandoned
ABANDONED_S = 600  # a temporary file this old is no write in progress (an image's takes well under a second)


def sweep_temporaries(out: Path, now: float | None = None) -> int:
    """Remove the temporary files under `out` that a killed run left (`files.temp_path` names, untouched for
    `ABANDONED_S` seconds: not another rank's write in progress, on any machine); returns how many."""
    now = time.time() if now is None else now
    removed = 0
    for folder, _, names in os.walk(out):
        for name in names:
            path = Path(folder) / name
            try:
                if TEMPORARY.fullmatch(name) and now - path.stat().st_mtime > ABANDONED_S:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
    return removed


def settings_digest(settings: dict) -> str:
    """A short sha256 of `settings` (each manifest line carries it)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def check_settings(out: Path, settings: dict, record: bool = False) -> None:
    """Refuse `settings` in one line naming those that differ when `out` holds a translation started with others.
    `record`: also record them when none are yet (once the model has loaded: a run that fails before its work
    records nothing); two ranks starting together agree, the first file linked in wins."""
    path = state_dir(out) / "settings.json"
    if record and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        try:
            tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            fsync(tmp)
            os.link(tmp, path)  # fails if another rank linked first
            fsync(path.parent)
            return
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    if not path.exists():
        return
    try:
        before = flatten(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise Vis2IRError(f"{path}: unreadable ({e}); it records the settings this output was started with: "
                          "remove the output folder to start again") from None
    now = flatten(settings)
    differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if differ:
        listed = ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in differ[:4])
        raise Vis2IRError(f"--out {out}: holds a translation started with other settings ({listed}); finish it "
                          "with the same model and settings, or write to another --out")


def claim_finalize(out: Path, force: bool = False) -> bool:
    """Whether this process finalizes: the first to create `finalize.lock` (holding its host and pid) does. A lock
    left by a process of this host that is gone is taken over; `force` (`--finalize`) takes any lock.
    `release_finalize` removes it."""
    lock = state_dir(out) / "finalize.lock"
    me = f"{socket.gethostname()} {os.getpid()}"
    if force or _stale(lock):
        lock.unlink(missing_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(me)
    return True


def _stale(lock: Path) -> bool:
    try:
        host, pid = lock.read_text().split()
        if host != socket.gethostname():
            return False  # another machine's: it cannot be told from here
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


def release_finalize(out: Path) -> None:
    (state_dir(out) / "finalize.lock").unlink(missing_ok=True)


def finished_counts(out: Path) -> dict | None:
    """The counts of the last finalize (`finished.json`, with the digest of the names done), None when none."""
    try:
        return json.loads((state_dir(out) / "finished.json").read_text(encoding="utf-8"))["counts"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def names_digest(names) -> str:
    """A short sha256 of a set of names, in sorted order."""
    return hashlib.sha256("\n".join(sorted(names)).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def card_name(source: Path) -> str:
    """The data-set card's file name: README.md, unless the source has its own (carried over unchanged)."""
    return "TRANSLATION.md" if (Path(source) / "README.md").exists() else "README.md"


def write_finished(out: Path, source: Path, layout: str, settings: dict, counts: dict, failed: dict[str, str],
                   seconds: float, date: str, model: str) -> Path:
    """`finished.json` and the data-set card (`model`: what the card names the model by); returns the card's path."""
    write_json(state_dir(out) / "finished.json", {"date": date, "counts": counts, "failed": failed,
                                                   "seconds": round(seconds, 1)})
    shown = {k: v for k, v in flatten(settings).items() if k not in ("source", "layout")}
    lines = [
        f"# {Path(source).resolve().name}, translated to infrared by vis2ir",
        "",
        f"- Source: `{Path(source).resolve()}` ({layout})",
        f"- Model: {model}",
        f"- Date: {date}",
        f"- Photos: {counts['photos']}; translated {counts['done']}; failed {counts['failed']}",
        "- Settings:",
        *(f"  - `{k}`: {v}" for k, v in sorted(shown.items())),
        "",
        "Each infrared image has its photo's name, folder and size; the annotations are the source's, unchanged "
        "(where the images were written as PNG, only their file names' suffix). The images are generated, not "
        "measured: see the model's evaluation before training detectors on them.",
    ]
    if failed:
        lines += ["", f"## Left out ({len(failed)}): their images and annotations are not in this data set", ""]
        lines += [f"- `{name}`: {why}" for name, why in list(failed.items())[:100]]
        if len(failed) > 100:
            lines.append(f"- ... and {len(failed) - 100} more (`.vis2ir/finished.json`)")
    return write_text(Path(out) / card_name(source), "\n".join(lines) + "\n")
