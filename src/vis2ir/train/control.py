"""When a launch may start and where it stops.

A launch starts a new run only in a folder that holds no checkpoint (a folder left by a launch that
failed before its first checkpoint holds none: it is no run yet) and lies inside no run or checkpoint
(`enclosing_run`; pruning deletes only checkpoint folders, `is_checkpoint`), and continues one only below its
`train.max_steps`: both are answered in one line before any model loads (`check_new_run`,
`check_unfinished`).

It stops only between optimizer steps (`StepBoundaryStop`): with `train.accumulate_grad_batches > 1`
Lightning calls the batch hooks once per micro-batch while `global_step` counts optimizer steps, and a
stop inside an accumulated step would save a loop state in the middle of it, which a resume continues
out of phase. A stop signal (`vis2ir.signals`) saves the step just finished and raises `Stopped` (Ctrl-C:
`KeyboardInterrupt`); `train.max_minutes` ends the launch as `train.max_steps` would.
"""

from __future__ import annotations

import logging
import shlex
import signal
import time
from functools import partial
from pathlib import Path
from typing import Callable

import lightning as L
import torch

from vis2ir.checkpoint_files import list_checkpoints
from vis2ir.errors import Vis2IRError
from vis2ir.signals import StopRequests, Stopped, signal_name, worker_ignores_stop_signals

log = logging.getLogger(__name__)


def check_new_run(run_dir: str | Path) -> None:
    """Refuse to start a new run in `run_dir` when it already holds a run (a checkpoint): training from the
    initial weights there would overwrite some of its checkpoints and leave others, mixing two runs; or when
    it lies inside a run or a checkpoint (`enclosing_run`), whose files and pruning it would mix with its own."""
    found = list_checkpoints(Path(run_dir) / "checkpoints")
    if found:
        raise Vis2IRError(f"train.output_dir={run_dir} already holds a run (newest checkpoint {found[-1]}); continue "
                          f"it with: vis2ir train --resume {run_dir}, or train into a new train.output_dir, or delete "
                          f"{run_dir} to start it again")
    if (outer := enclosing_run(run_dir)) is not None:
        what, folder = outer
        raise Vis2IRError(f"train.output_dir={run_dir} lies inside {what}; a run there would mix its files with "
                          f"that one's (and its pruning could delete them): choose another train.output_dir, outside "
                          f"{folder}")


def is_checkpoint(folder: Path) -> bool:
    """Whether `folder` is a checkpoint folder: a config.yaml beside weights, and no sub-folder (a run has some)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return False
    return (folder / "config.yaml").is_file() and any(p.suffix == ".safetensors" for p in entries) \
        and not any(p.is_dir() for p in entries)


def enclosing_run(folder: str | Path) -> tuple[str, Path] | None:
    """(the outermost run or checkpoint that `folder` lies inside, in words; its folder), or None: a folder
    above `folder` holds `checkpoints/step-N/` (a run: also when `folder` is in its checkpoints/ folder or in
    one of its checkpoints), or is a checkpoint folder."""
    for above in reversed(Path(folder).expanduser().absolute().parents):
        if list_checkpoints(above / "checkpoints"):
            return f"the run {above}", above
        if is_checkpoint(above):
            return f"the checkpoint {above}", above
    return None


def check_unfinished(state: Path, step: int, max_steps: int, resume: str) -> None:
    """Refuse to resume the checkpoint whose resume state is `state` (at optimizer step `step`) when the run
    has nothing left to do: `step >= train.max_steps`."""
    if step < max_steps:
        return
    folder = state.parent
    run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else folder
    raise Vis2IRError(f"--resume {resume}: the run is finished at step {step} ({folder}; train.max_steps={max_steps}); "
                      f"to train on, raise train.max_steps, e.g. vis2ir train --resume {run_dir} "
                      f"train.max_steps={max(2 * step, step + 1)}")


def resume_command(run_dir: Path) -> str:
    """The command line that continues the run in `run_dir` with its own settings."""
    return f"vis2ir train --resume {shlex.quote(str(run_dir))}"


class StepBoundaryStop(L.Callback):
    """Stops training between optimizer steps only: on a stop signal, or after `seconds` of this launch.

    `requests` holds the flag-only signal handlers, (re)installed when training starts (over Lightning's
    SIGTERM handler, which would stop inside an accumulated step). On a signal the step just finished is
    saved by `save(trainer, module, step)` and `Stopped` is raised (no validation, no other work: a
    scheduler's grace period is short). With several processes the ranks agree by an all-reduce at every
    optimizer step, read one step later (no wait for the device), so all stop at the same step.
    """

    def __init__(self, requests: StopRequests, save: Callable, seconds: float | None = None, hint: str = ""):
        self.requests, self.save, self.seconds, self.hint = requests, save, seconds, hint
        self.started, self.step, self._pending = None, None, None

    def on_train_start(self, trainer, module) -> None:
        self.started, self.step, self._pending = time.monotonic(), trainer.global_step, None
        launcher = trainer.strategy.launcher
        if launcher is not None and trainer.is_global_zero and hasattr(launcher, "kill"):
            self.requests.forward = launcher.kill  # SIGTERM/SIGUSR1 reach the ranks this process launched
        self.requests.install()
        shield_workers(trainer.train_dataloader)

    def on_validation_start(self, trainer, module) -> None:
        shield_workers(trainer.val_dataloaders)  # made when the first validation starts

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            return  # inside an accumulated step
        self.step = trainer.global_step
        signum, out_of_time = self._decide(trainer)
        if signum:
            self.save(trainer, module, trainer.global_step)
            raise Stopped(signum)
        if out_of_time and not trainer.should_stop:
            trainer.should_stop = True
            log.warning("Stopping at step %d of %d: this launch has run train.max_minutes=%g; continue with: %s",
                        trainer.global_step, trainer.max_steps, self.seconds / 60, self.hint)

    def on_save_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        """A checkpoint written inside an accumulated step (a `KeyboardInterrupt` raised there: a second Ctrl-C)
        holds the last finished step's weights, but Lightning's loop counters count the micro-batches of the
        unfinished one too; put them back to that step's boundary, as a checkpoint written there holds them,
        so that a resume starts the next step with its first micro-batch."""
        fit = checkpoint.get("loops", {}).get("fit_loop", {})
        batches = fit.get("epoch_loop.batch_progress")
        boundary = trainer.global_step * trainer.accumulate_grad_batches
        if not batches or batches["total"]["processed"] <= boundary:
            return
        total = batches["total"]["processed"]
        for counters in (batches["current"], batches["total"]):  # `current` counts from this epoch's start
            offset = total - counters["processed"]
            for key in ("ready", "started", "processed", "completed"):
                counters[key] = boundary - offset
        if "epoch_loop.state_dict" in fit:
            fit["epoch_loop.state_dict"]["_batches_that_stepped"] = trainer.global_step
        zero_grad = fit.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {}) \
            .get("zero_grad", {})
        for counters in zero_grad.values():
            for key in counters:
                counters[key] = min(counters[key], trainer.global_step)

    def _decide(self, trainer) -> tuple[int, bool]:
        """(signal to stop on or 0, whether the time is up), the same on every rank."""
        signum = self.requests.signum or 0
        out_of_time = self.seconds is not None and time.monotonic() - self.started >= self.seconds
        if trainer.world_size == 1:
            return signum, out_of_time
        flags = torch.zeros(2, device=trainer.strategy.root_device)
        flags[0], flags[1] = float(signum), float(out_of_time)  # fills on the device: no copy from the host
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        event = None
        if flags.device.type == "cuda":  # copied as the step's work ends, read a step later: no wait
            flags, event = flags.to("cpu", non_blocking=True), torch.cuda.Event()
            event.record()
        decided, self._pending = self._pending, (flags, event)
        if decided is None:
            return 0, False
        if decided[1] is not None:
            decided[1].synchronize()
        signum, out_of_time = decided[0].tolist()
        return int(signum), bool(out_of_time)


def shield_workers(loaders) -> None:
    """Make the worker processes of `loaders` (a DataLoader, or Lightning's combination of them; workers not
    started yet) ignore the stop signals, keeping the loader's own `worker_init_fn` after that."""
    from torch.utils.data import DataLoader

    flat = getattr(loaders, "flattened", None)
    for loader in flat if flat is not None else [loaders]:
        if isinstance(loader, DataLoader) and loader.num_workers > 0:
            then = loader.worker_init_fn
            if getattr(then, "func", None) is not worker_ignores_stop_signals:
                loader.worker_init_fn = partial(worker_ignores_stop_signals, then=then)


def stop_message(err: Stopped, step: int, run_dir: Path, hint: str) -> str:
    """The line a stop by signal logs: the step saved, the newest checkpoint and the resume command."""
    kept = list_checkpoints(run_dir / "checkpoints")
    how = "Interrupted" if err.signum == signal.SIGINT else f"Stopped by {signal_name(err.signum)}"
    return (f"{how} at step {step}; " + (f"newest checkpoint {kept[-1]}; resume with: {hint}" if kept
                                           else "no checkpoint was written (nothing to resume)"))
