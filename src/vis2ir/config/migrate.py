"""Settings files written by an older vis2ir: values it accepted that this one refuses are replaced, with a
warning, when a file is read (`vis2ir.config.loading`), so old runs and checkpoints still load."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


# Values an older vis2ir accepted, and saved in run and checkpoint configs, that this one refuses:
# (section, key, old values, replacement, why). In a file they are replaced with a warning, so old runs and
# checkpoints still load; typed as an override they are refused like any other bad value.
RETIRED = [("sample", "compile_mode", ("reduce-overhead", "max-autotune"), "default",
            "its CUDA graphs overwrote one block's output with the next block's under regional compilation")]
_warned: set[tuple[str, str]] = set()


def replace_retired(raw: dict, path: Path) -> None:
    """Replace, in the settings read from `path`, the values listed in `RETIRED` (a warning once per file)."""
    for section, key, old, new, why in RETIRED:
        settings = raw.get(section)
        if isinstance(settings, dict) and settings.get(key) in old:
            if (str(path), key) not in _warned:
                _warned.add((str(path), key))
                log.warning("%s: %s.%s=%s is no longer offered (%s); using %s", path, section, key, settings[key],
                            why, new)
            settings[key] = new
