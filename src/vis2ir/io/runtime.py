"""Devices and processes: the default device, this process's rank, and its share of a job."""

from __future__ import annotations

import os

import torch

from vis2ir.errors import Vis2IRError


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device` (`--device`: cpu, cuda or cuda:N), else `cuda:$LOCAL_RANK` when CUDA is available, else the CPU.

    Raises `Vis2IRError` (one line) for a name that is not a device, another kind of device, a CUDA device
    this machine does not have, or a LOCAL_RANK that names none, before any model loads."""
    if device is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local, count = os.environ.get("LOCAL_RANK", "0"), torch.cuda.device_count()
        if not local.strip().isdigit() or int(local) >= count:
            raise Vis2IRError(f"LOCAL_RANK={local!r}: expected an integer from 0 to {count - 1} (this machine's CUDA "
                              "devices; torchrun sets it), or pass --device")
        return torch.device("cuda", int(local))
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda"):
        raise Vis2IRError(f"--device {str(device)!r}: expected cpu, cuda or cuda:N")
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise Vis2IRError(f"--device {str(device)!r}: CUDA is not available on this machine (torch "
                              f"{torch.__version__}); use --device cpu")
        if chosen.index is not None and chosen.index >= count:
            raise Vis2IRError(f"--device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0 to "
                              f"cuda:{count - 1}")
    return chosen


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
