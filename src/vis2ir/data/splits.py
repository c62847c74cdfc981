"""Deterministic train/val/test splits: official names where a data set has them, else a name hash."""

from __future__ import annotations

import hashlib

SPLITS = ("train", "val", "test")
_ALIASES = {"train": "train", "training": "train", "trainval": "train", "val": "val", "valid": "val",
            "validation": "val", "dev": "val", "test": "test", "testing": "test"}


def split_alias(text: str) -> str | None:
    """'validation' -> 'val', 'training' -> 'train', ...; None when `text` names no split."""
    return _ALIASES.get(text.lower())


def name_fraction(name: str) -> float:
    """A number in [0, 1) fixed by `name` (SHA-1, the same on every machine and Python). A name read from a
    file name that is not UTF-8 (surrogate escapes, as `os.listdir` gives them) is hashed as its bytes."""
    return int.from_bytes(hashlib.sha1(name.encode("utf-8", "surrogateescape")).digest()[:8], "big") / 2.0**64


def hash_split(name: str, val_fraction: float, test_fraction: float) -> str:
    """The split of a sample with no official split: about the given fractions go to val and test."""
    u = name_fraction(name)
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def assign_splits(names: list[str], official: list[str | None], val_fraction: float,
                  test_fraction: float) -> list[str]:
    """Final splits: official ones kept, a val part carved from official train when the set has no val,
    and the name hash for samples with no official split."""
    carve = "train" in official and "val" not in official
    out = []
    for name, split in zip(names, official):
        if split is None:
            out.append(hash_split(name, val_fraction, test_fraction))
        elif split == "train" and carve and name_fraction(name) < val_fraction:
            out.append("val")
        else:
            out.append(split)
    return out
