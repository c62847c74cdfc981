"""The bad-step guard: a step whose loss or gradients are NaN/inf still counts but changes no weight.

The decision never waits for the GPU: the loss of every micro-batch is flagged on the device (`see_loss`),
the fused AdamW skips the step itself when told (`found_inf`, as under loss scaling; other optimizers get no
gradients), and the host reads the step's flags one step later (at once on the CPU) to count bad steps,
warn, and stop after `train.max_bad_steps` in a row (`count`). So step N's checkpoint has read N batches,
the logs say N, and a resume from it reads batch N next.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from vis2ir.checkpoint_files import list_checkpoints
from vis2ir.errors import Vis2IRError

log = logging.getLogger(__name__)


class BadStepGuard:
    """Flags, skips and counts the bad steps of a run writing its checkpoints under `output_dir`."""

    def __init__(self, max_bad_steps: int, output_dir: str | Path):
        self.max_bad_steps, self.output_dir = max_bad_steps, output_dir
        self.streak = 0  # bad steps in a row, as counted on the host
        self._loss_bad: torch.Tensor | None = None  # on the device: a micro-batch of this step had a NaN/inf loss
        self._loss_seen: torch.Tensor | None = None  # … and that loss (the last non-finite one), for the message
        self._pending: list[tuple] = []  # (step, loss, norm, bad, event) of steps not yet counted on the host

    def see_loss(self, loss: torch.Tensor) -> None:
        """Flag a micro-batch's loss (a scalar) on the device, without waiting for it."""
        bad = ~torch.isfinite(loss.detach())
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad
        seen = loss.detach().float()
        self._loss_seen = seen if self._loss_seen is None else torch.where(bad, seen, self._loss_seen)

    def skip_if_bad(self, optimizer, params: list[torch.Tensor], norm: torch.Tensor | None, step: int,
                    scaled: bool = False, world_size: int = 1, device: torch.device | str = "cpu") -> None:
        """Before the optimizer step `step`: skip its update when its loss or gradient norm `norm` (None: no
        gradients) is not finite, on every rank together (`world_size > 1`: one all-reduce), and note it
        for `count`. `params`: those with gradients. `scaled`: fp16 loss scaling, whose scaler handles inf
        gradients itself (lowering the scale is not a bad step)."""
        zero = torch.zeros((), dtype=torch.bool, device=device)
        loss_bad = self._loss_bad if self._loss_bad is not None else zero
        grad_bad = ~torch.isfinite(norm) if norm is not None and not scaled else zero
        bad = (loss_bad | grad_bad).float()
        if world_size > 1:  # every rank skips together
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        loss = self._loss_seen if self._loss_seen is not None else zero.float()
        self._loss_bad = self._loss_seen = None
        raw = getattr(optimizer, "optimizer", optimizer)
        if isinstance(raw, torch.optim.AdamW) and raw.defaults.get("fused"):
            raw.found_inf = bad
        elif bool(bad):  # other optimizers cannot skip on the device: drop the gradients (one sync)
            for p in params:
                p.grad = None
        self._pending.append(_to_host(step, loss, norm if norm is not None else zero.float(), bad))

    def count(self, lag: int = 0) -> None:
        """Count the bad steps of all but the newest `lag` noted steps; warn; raise `Vis2IRError` after
        `max_bad_steps` in a row, naming the last good checkpoint kept."""
        while len(self._pending) > lag:
            step, *values, event = self._pending.pop(0)
            if event is not None:
                event.synchronize()
                values = values[0].tolist()
            else:
                values = [float(v) for v in values]
            loss, norm, bad = values
            if not bad:
                self.streak = 0
                continue
            self._report(step, "loss" if not np.isfinite(loss) else "gradient norm",
                         loss if not np.isfinite(loss) else norm)

    def _report(self, step: int, what: str, value: float) -> None:
        self.streak += 1
        log.warning("step %d: %s is %s (%d/%d bad steps in a row); skipping the update", step, what,
                    value, self.streak, self.max_bad_steps)
        if self.streak >= self.max_bad_steps:
            kept = list_checkpoints(self.output_dir)  # only finite weights are ever written
            raise Vis2IRError(
                f"training stopped at step {step}: the {what} was NaN/inf for {self.streak} steps "
                f"in a row (train.max_bad_steps); "
                + (f"the last good checkpoint is kept: {kept[-1]}" if kept else
                   f"no checkpoint with finite weights was written under {Path(self.output_dir) / 'checkpoints'}")
                + "; try a lower train.learning_rate")


def _to_host(step: int, *values: torch.Tensor) -> tuple:
    """Start copying a step's flags to the host without waiting; `BadStepGuard.count` reads them."""
    if values[0].device.type != "cuda":
        return step, *values, None
    host = torch.stack([v.detach().float() for v in values]).to("cpu", non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return step, host, event
