"""Devices and processes: the default device, this process's rank, its share of a job, and its CPU threads.

Imports torch only inside the functions that need it: `setup_threads` runs before torch is first imported
(`vis2ir.cli.main`), since OpenMP reads its wait policy when torch loads it."""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

from vis2ir.errors import Vis2IRError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

THREADS_ENV = "VIS2IR_THREADS"  # the default of `vis2ir --threads`


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device` (`--device`: cpu, cuda or cuda:N), else `cuda:$LOCAL_RANK` when CUDA is available, else the CPU.

    Raises `Vis2IRError` (one line) for a name that is not a device, another kind of device, a CUDA device
    this machine does not have, or a LOCAL_RANK that names none, before any model loads."""
    import torch

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


def free_cores(cores: int, load: float) -> int:
    """The CPU cores free now: `cores` (this process may run on) minus `load` (the 1-minute load average: the
    processes running or waiting to run), to the nearest whole core, at least 1 and at most `cores`."""
    return max(1, min(cores, math.floor(cores - load + 0.5)))


def parse_threads(value: str, source: str) -> int | None:
    """`value` of `--threads` or $VIS2IR_THREADS (`source`, for the message): a whole number ≥ 1, or None for
    `auto`. Raises `Vis2IRError` (one line) for anything else."""
    text = value.strip().lower()
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        sep = "=" if source.isupper() else " "  # VIS2IR_THREADS='0', --threads 'x'
        raise Vis2IRError(f"{source}{sep}{value!r}: expected a whole number of CPU threads (1 or more) or auto")
    return int(text)


def thread_plan(requested: str | None, environ: MutableMapping[str, str], cores: int, load: float | None
                ) -> tuple[int | None, bool, str]:
    """How many CPU threads torch should use, whether OpenMP's idle threads should wait passively, and why:
    `(threads, passive, reason)`. `requested`: `--threads` (None: $VIS2IR_THREADS, else auto); `cores`: the
    cores this process may run on; `load`: the 1-minute load average (None: unknown). Auto takes the cores
    free now (`free_cores`); OMP_NUM_THREADS, set by the user, is kept when nothing is requested (`threads`
    None). Passive waiting where other work shares the cores (fewer free than `cores`, or than the threads):
    a spinning thread there takes the core its team waits for; on free cores spinning is faster.
    Raises `Vis2IRError` for a malformed setting."""
    source = "--threads" if requested is not None else THREADS_ENV
    value = requested if requested is not None else environ.get(THREADS_ENV)
    chosen = parse_threads(value, source) if value else None
    free = cores if load is None else free_cores(cores, load)
    if chosen is not None:
        reason = f"--threads {chosen}" if requested is not None else f"{THREADS_ENV}={chosen}"
        return chosen, free < max(cores, chosen), reason
    if value is None and environ.get("OMP_NUM_THREADS"):
        return None, free < cores, f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']}"
    if load is None:
        return cores, False, "the load is unknown"
    return free, free < cores, ("the machine is idle" if free == cores else "the machine is busy") + \
        f" (load {load:.1f})"


def setup_threads(requested: str | None = None) -> int | None:
    """Set torch's CPU threads for a `vis2ir` command (its `--threads N|auto`, `requested`; None: $VIS2IR_THREADS,
    else auto: the cores free now; `thread_plan`) with `torch.set_num_threads`, and log the choice in one line
    (INFO where it differs from torch's default). Called before torch is first imported, it also sets
    OMP_WAIT_POLICY=PASSIVE (unless set) where the cores are shared: idle OpenMP threads then sleep instead
    of spinning, which on a busy machine took the cores their own team was waiting for (docs/performance.md,
    "A busy CPU"). Called after (vis2ir run from Python), auto leaves the caller's threads alone. GPU work is
    unchanged: only CPU kernels use these threads. Returns the number of threads set, None when none was.
    Raises `Vis2IRError` for a malformed `--threads` or $VIS2IR_THREADS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    threads, passive, reason = thread_plan(requested, os.environ, cores, load)
    explicit = reason.startswith(("--threads", THREADS_ENV))
    if "torch" in sys.modules and not explicit:
        return None
    if passive:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP (no effect after)
    if threads is None:
        log.debug("CPU threads: as %s says", reason)
        return None
    import torch

    torch.set_num_threads(threads)
    hint = "" if explicit else "; --threads N to choose"
    # said where it changes something: on an idle machine auto is torch's own default, all the cores
    log.log(logging.INFO if explicit or threads < cores else logging.DEBUG, "Using %d CPU thread%s of %d: %s%s",
            threads, "" if threads == 1 else "s", cores, reason, hint)
    return threads
