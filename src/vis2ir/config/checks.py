"""What every settings module shares: `ConfigError`, the one-line check of a value and the seed bound."""

from __future__ import annotations

from typing import Any

from vis2ir.errors import Vis2IRError


class ConfigError(Vis2IRError):
    """A setting is unknown or has a value that is not allowed."""


def check(ok: bool, key: str, expected: str, got: Any) -> None:
    """Nothing when `ok`, else a one-line `ConfigError`: `KEY: expected EXPECTED, got GOT`."""
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


# Every seed (model.seed, model.text.seed, data.synth_seed, train.seed, sample.seed, and the command-line seeds)
# is in [0, SEED_LIMIT): Lightning's seed_everything (train.seed) and numpy's legacy seeding take 32-bit seeds
# only, torch's generators 64-bit ones; one bound for all of them keeps derived seeds in range too
# (train.seed * 1000003 + position, sample.seed + noise draw: far below 2**63).
SEED_LIMIT = 2**32
SEED_EXPECTED = f"an integer from 0 to {SEED_LIMIT - 1} (2**32 - 1)"


def check_seed(seed: Any, key: str) -> int:
    """`seed` when it is an integer in [0, SEED_LIMIT), else a one-line `ConfigError` naming `key`."""
    check(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < SEED_LIMIT, key, SEED_EXPECTED,
          seed)
    return seed
