"""Devices and processes: the default device, this process's rank, and its share of a job."""

from __future__ import annotations

import os

import torch

from vis2ir.errors import Vis2IRError


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device`, else `cuda:$LOCAL_RANK` when CUDA is available, else the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def dist_env() -> tuple[int, int]:
    """`(rank, world_size)` from the RANK / WORLD_SIZE variables torchrun and accelerate set (else 0, 1)."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise Vis2IRError(f"RANK={os.environ.get('RANK')!r}, WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}: "
                          "expected integers") from None
    if not 0 <= rank < world:
        raise Vis2IRError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    return rank, world


def shard(items: list, rank: int, world: int) -> list:
    """This process's share of `items`: every `world`-th from `rank` (all shares together: each item once)."""
    return items[rank::world]
