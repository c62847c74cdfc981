"""Checkpoint export: `checkpoints/step-N/` written atomically at the run's cadence, at its end and on a
stop, each with its run identity (`identity.py`); the last `train.keep_last` kept."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import lightning as L

from vis2ir.checkpoint import (RESUME_FILE, checkpoint_size, failed_save, list_checkpoints, replace_dir,
                               save_resume_state, temp_dir, write_manifest, write_weights)
from vis2ir.config import Config
from vis2ir.sharding import trainable_state
from vis2ir.train.control import is_checkpoint, resume_command
from vis2ir.train.identity import run_identity, write_run_identity

log = logging.getLogger(__name__)


class CheckpointExport(L.Callback):
    """Writes `checkpoints/step-N/` (weights, config, resume state) atomically; keeps the last K.

    Never writes weights that are not all finite, and prunes only checkpoints older than the one it
    has just written: the newest good checkpoint always survives, and a resumed run deletes nothing
    of the old one before it has written a newer checkpoint. Ctrl-C writes the last finished step.
    Every checkpoint holds its run identity, `run.json` (`vis2ir.train.identity`; `data`: the training
    data's fingerprint), written before the folder is published.
    """

    def __init__(self, cfg: Config, run_dir: Path, data: dict | None = None, base: Path | dict | None = None):
        self.cfg, self.run_dir, self.last, self.data, self.base = cfg, run_dir, -1, data, base

    def on_train_start(self, trainer, module) -> None:
        self.last = trainer.global_step  # a resumed run's first step is on disk already

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.cfg.train.checkpoint_every == 0:
            self.save(trainer, module, step)

    def on_train_end(self, trainer, module) -> None:
        if trainer.global_step > 0:
            self.save(trainer, module, trainer.global_step)

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt):
            return
        # Optimizer steps finished; the interrupted one is redone on resume (from its first micro-batch:
        # `StepBoundaryStop.on_save_checkpoint` puts the loop counters back to the step's boundary).
        step = trainer.global_step
        if step > 0:
            self.save(trainer, module, step)
        kept = list_checkpoints(self.run_dir)
        if trainer.is_global_zero:
            log.warning("Interrupted at step %d; %s; resume with: %s", step,
                        f"newest checkpoint {kept[-1]}" if kept else "no checkpoint was written",
                        resume_command(self.run_dir) if kept else "(nothing to resume)")

    def save(self, trainer, module, step: int) -> None:
        """Write the checkpoint of `step` of the `Vis2IRModule` `module` (every rank joins), unless written already
        or its weights are not all finite; then prune the older ones. Raises `Vis2IRError` for a full disk."""
        if step == self.last:
            return
        self.last = step
        final = self.run_dir / "checkpoints" / f"step-{step}"
        if not module.weights_are_finite():
            kept = [p for p in list_checkpoints(self.run_dir) if int(p.name[5:]) < step]
            log.warning("step %d: the trainable weights are not all finite; no checkpoint written (%s)", step,
                        f"the last good one is {kept[-1]}" if kept else "none written before")
            return
        tmp = trainer.strategy.broadcast(temp_dir(final))  # rank 0's name: every rank writes there
        state = trainable_state(module.model)  # every rank: under FSDP it gathers the shards to rank 0
        error = None
        if trainer.is_global_zero:
            try:
                tmp.mkdir(parents=True)
                write_weights(tmp, module.model, self.cfg, state, self.base)
            except Exception as err:  # a full disk: one line; anything else as it is; no partial folder either way
                error = err
        if trainer.strategy.broadcast(error is not None):
            raise failed_save(tmp, final, error, checkpoint_size(module.model, self.cfg))
        trainer.strategy.barrier()
        try:
            save_resume_state(trainer, tmp / RESUME_FILE)  # staged in tmp, never the system temp folder
            if trainer.is_global_zero:
                write_run_identity(tmp, run_identity(step, self.data, self.cfg.train.init_from))
                write_manifest(tmp)
                replace_dir(tmp, final)
        except Exception as err:
            raise failed_save(tmp, final, err, checkpoint_size(module.model, self.cfg)) from None
        if trainer.is_global_zero:
            older = [p for p in list_checkpoints(self.run_dir) if int(p.name[5:]) < step]
            for old in older[:max(0, len(older) - (self.cfg.train.keep_last - 1))]:
                if is_checkpoint(old):
                    shutil.rmtree(old, ignore_errors=True)
                else:  # e.g. another run trained into it: never deleted with this run's old checkpoints
                    log.warning("%s: not pruned (train.keep_last): it is not a checkpoint of this run alone "
                                "(it holds sub-folders or no weights); move what it holds elsewhere", old)
            log.info("Saved checkpoint %s", final)
        trainer.strategy.barrier()
