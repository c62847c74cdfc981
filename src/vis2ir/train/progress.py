"""What a run shows and logs: the step progress bar, loggers that number scalars as checkpoints, the last
step's metrics, the launch folders of the logs, the validation samples picture; Lightning's console records
routed into ours."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

log = logging.getLogger(__name__)


def _no_tips(record: logging.LogRecord) -> bool:
    """Lightning's "💡 Tip: try installing litlogger / litmodels" lines (advertising printed on every run)."""
    return not str(record.msg).startswith("💡 Tip:")


# Lightning installs its own console handlers; let its records reach ours, in our format, without its tips
# (rank_zero_info logs them through these loggers; its warnings pass).
for _name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
              "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).handlers.clear()
    logging.getLogger(_name).propagate = True
    logging.getLogger(_name).addFilter(_no_tips)


LOG_DIRS = ("logs", "tensorboard")  # the CSV and TensorBoard loggers' folders; one version_K per launch


def log_versions(run_dir: str | Path) -> set[Path]:
    """The launch folders (`logs/version_K`, `tensorboard/version_K`) that exist in `run_dir`."""
    return {p for name in LOG_DIRS for p in Path(run_dir).glob(f"{name}/version_*") if p.is_dir()}


def metrics_logs(run_dir: str | Path) -> list[Path]:
    """The run's CSV scalar logs (`logs/version_N/metrics.csv`), one per launch, oldest first."""
    paths = Path(run_dir).glob("logs/version_*/metrics.csv")
    return sorted(paths, key=lambda p: int(p.parent.name.rpartition("_")[2]))


def data_epoch(steps: int, positions_per_step: int, epoch_length: int) -> int:
    """The pass through the training data (0: the first) in which optimizer step `steps` (counted from 1, as
    logged) read its last sample. Each step reads `positions_per_step` sample positions (batch × gradient
    accumulation × devices) and `vis2ir.data.order.Positioned` reads position k in pass k // `epoch_length`
    (the training split's size, or its positions per pass with aspect-ratio buckets)."""
    return max(0, steps * positions_per_step - 1) // epoch_length


class StepLogging(L.Callback):
    """Logs the last step of a launch even when it is not a multiple of `train.log_every` (Lightning logs
    only those), so a run shorter than `log_every` still writes its metrics; and gives the step-named loggers
    what they need to log the true `epoch` (`data_epoch`: training is one endless Lightning epoch, whose
    number stays 0)."""

    def on_train_start(self, trainer, module) -> None:
        loader = trainer.train_dataloader
        epoch_length = getattr(getattr(loader, "dataset", None), "epoch_length", None)
        if not epoch_length or not getattr(loader, "batch_size", None):
            return  # not our resumable order: Lightning's epoch stays
        per_step = loader.batch_size * trainer.accumulate_grad_batches * trainer.world_size
        for logger in trainer.loggers:
            if isinstance(logger, _StepNamed):
                logger.data_epochs = (per_step, epoch_length)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if 0 <= trainer.max_steps <= trainer.global_step:  # Lightning writes the step's metrics right after
            trainer.log_every_n_steps = 1


class StepProgressBar(TQDMProgressBar):
    """Counts the optimizer steps of this launch out of those it will run (`train.max_steps` minus the
    step it resumed from), not epochs: training is one endless epoch that ends at `max_steps`."""

    def on_train_start(self, trainer, module) -> None:
        super().on_train_start(trainer, module)
        self.on_train_epoch_start(trainer, module)

    def on_train_epoch_start(self, trainer, module) -> None:
        """The bar of this launch (a resumed launch starts inside its epoch: `on_train_start` calls this)."""
        self._first = trainer.global_step
        bar = self.train_progress_bar
        bar.reset(total=max(0, trainer.max_steps - self._first))
        bar.initial = 0
        bar.set_description(f"train steps {self._first + 1}-{trainer.max_steps}" if self._first else "train steps",
                            refresh=False)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        n = trainer.global_step - self._first
        bar = self.train_progress_bar
        if n != bar.n and self._should_update(n, bar.total):
            bar.n = n
            bar.refresh()
            if n % trainer.log_every_n_steps == 0 or n == bar.total:  # reading the scalars waits for the GPU
                bar.set_postfix(self.get_metrics(trainer, module))

    @property
    def train_description(self) -> str:
        return "train steps"

    def get_metrics(self, trainer, module) -> dict:
        metrics = super().get_metrics(trainer, module)
        metrics.pop("v_num", None)  # the launch's log folder number, not a measurement
        return metrics


class _StepNamed:
    """Logs a step's scalars under the number of optimizer steps done with it, the N of the checkpoint
    `step-N` written after it (Lightning passes the count before the step: one less), and `epoch` as the pass
    through the training data that step read (`data_epoch`; `data_epochs`: its positions per step and per
    pass, set when training starts by `StepLogging`)."""

    data_epochs: tuple[int, int] | None = None

    def log_metrics(self, metrics, step=None):
        step = None if step is None else step + 1
        if step is not None and "epoch" in metrics and self.data_epochs:
            metrics = {**metrics, "epoch": data_epoch(step, *self.data_epochs)}
        return super().log_metrics(metrics, step)


class StepCSVLogger(_StepNamed, CSVLogger):
    """`logs/version_K/metrics.csv`, steps numbered as checkpoints."""


class StepTensorBoardLogger(_StepNamed, TensorBoardLogger):
    """`tensorboard/version_K/`, steps numbered as checkpoints."""


@torch.no_grad()
def samples_picture(model, cfg, step: int, loggers, vis: torch.Tensor, ir: torch.Tensor, sem: torch.Tensor | None,
                    write: bool = True) -> None:
    """visible | generated | ground truth | semantic (images `[B, 3, H, W]` in [0, 1]) of a `Vis2IRModel` at
    `step`, saved under the run's samples/ and sent to the TensorBoard `loggers` (`write=False`: generated
    only, for a sharded model's forward that every rank must join). Not finite: a warning, no picture."""
    from vis2ir.figures import figure_array, save_figure
    from vis2ir.io.images import is_finite
    from vis2ir.sample import generate
    from vis2ir.visualize import labelled_grid

    s = cfg.sample
    generated = generate(model, vis, sem if model.mode != "none" else None, steps=s.steps, guidance=s.guidance,
                         seed=s.seed)
    if not write:
        return
    if not is_finite(generated):  # a black grid would look like a result
        log.warning("step %d: the validation samples are not finite (NaN/inf); no samples picture written", step)
        return
    columns = {"visible": vis, "generated": generated, "truth": ir}
    if sem is not None:
        columns["semantic"] = sem
    fig = labelled_grid(columns, title=f"Validation samples at step {step} "
                                       f"({s.steps} sampling steps, guidance {s.guidance:g})")
    path = save_figure(Path(cfg.train.output_dir) / "samples" / f"step-{step}.png", fig)
    grid = figure_array(fig)
    for logger in loggers:
        if hasattr(logger.experiment, "add_image"):
            logger.experiment.add_image("val/samples", grid, step, dataformats="HWC")
    log.info("Validation samples: %s", path)
