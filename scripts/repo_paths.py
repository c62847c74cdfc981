"""Paths as the benchmark scripts record them in their JSON figures: relative to the repository, so a file
under docs/performance/ names the config or schedule it used the same way on every machine and tells nothing
of the machine it ran on. The scripts import it from their own folder (`python scripts/NAME.py` puts
scripts/ first on `sys.path`)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: scripts/..


def repo_relative(path: str | Path | None) -> str | None:
    """`path` (absolute, or relative to the working folder) as a POSIX path relative to the repository root
    when it lies inside the repository (`/work/main/configs/x.yaml` → `configs/x.yaml`); a path outside it
    (a scratch folder) is kept as given, since no repository path names it; None stays None."""
    if path is None:
        return None
    try:
        return Path(path).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)
