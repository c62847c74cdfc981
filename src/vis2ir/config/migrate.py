"""Settings files written by an older vis2ir: values it accepted that this one refuses are replaced, and keys it
named otherwise are moved, with a warning, when a file is read (`vis2ir.config.loading`), so old runs and
checkpoints still load. Typed as overrides, the old spellings are refused with a hint naming the new one."""

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

# Settings an older vis2ir named otherwise: (section, old key, the values it took, new key). `model.backbone` was
# where the weights came from (pretrained | random) before it named the base model (flux1-fill | flux1-kontext).
MOVED = [("model", "backbone", ("pretrained", "random"), "weights")]


def move_renamed(raw: dict, path: Path) -> None:
    """Move, in the settings read from `path`, the old keys of `MOVED` holding an old value to their new key
    (a warning once per file); a file that also sets the new key keeps the new key's value."""
    for section, key, old, new in MOVED:
        settings = raw.get(section)
        if isinstance(settings, dict) and isinstance(settings.get(key), str) and settings[key] in old:
            value = settings.pop(key)
            settings.setdefault(new, value)
            if (str(path), key) not in _warned:
                _warned.add((str(path), key))
                log.warning("%s: %s.%s=%s is now %s.%s=%s (%s.%s names the base model now); reading it so",
                            path, section, key, value, section, new, value, section, key)


def move_renamed_flat(flat: dict) -> dict:
    """`flat` (dotted keys, e.g. an old latent cache's recorded settings) with the old keys of `MOVED` moved; an
    old record lacks the key's new meaning, which then takes its first (the default) value."""
    flat = dict(flat)
    for section, key, old, new in MOVED:
        dotted = f"{section}.{key}"
        if flat.get(dotted) in old:
            flat[f"{section}.{new}"] = flat.pop(dotted)
            flat[dotted] = "flux1-fill"
    return flat


def renamed_hint(key: str, value) -> str | None:
    """For an override `key=value` that an older vis2ir took under another name, the one-line refusal."""
    for section, old_key, old, new in MOVED:
        if key == f"{section}.{old_key}" and value in old:
            return (f"override {key}={value}: that setting is now {section}.{new}={value} "
                    f"({key} names the base model: flux1-fill or flux1-kontext)")
    return None


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
