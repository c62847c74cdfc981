"""A launch of `vis2ir train`: the checks before any model loads, the Trainer and its callbacks, the fit,
and what a stop or failure leaves and says.

Lightning runs the loop, the devices and the strategy (DDP, or FSDP2 through `sharding.py`; DeepSpeed is
refused). Checkpoints (`export.py`) are written every `train.checkpoint_every` steps, at the end and on a
stop (Ctrl-C, SIGTERM, SIGUSR1, `train.max_minutes`: at an optimizer-step boundary, `control.py`);
`--resume` continues a run exactly (same data order, noise and RNG) with the run's own settings and data
(`resume.py`, `identity.py`).
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import warnings
from pathlib import Path

import lightning as L
import torch

from vis2ir.checkpoint import check_init_from, resolve_init_from
from vis2ir.config import Config
from vis2ir.errors import Vis2IRError
from vis2ir.files import check_writable
from vis2ir.model import Vis2IRModel
from vis2ir.quantize import out_of_memory
from vis2ir.sharding import ShardedStrategy
from vis2ir.signals import StopRequests, Stopped
from vis2ir.train.control import StepBoundaryStop, check_new_run, check_unfinished, resume_command, stop_message
from vis2ir.train.export import CheckpointExport
from vis2ir.train.identity import KeepOptimizerFlags, check_resume_identity
from vis2ir.train.module import Vis2IRModule
from vis2ir.train.prepare import resolved_precision
from vis2ir.train.progress import StepLogging, StepCSVLogger, StepProgressBar, StepTensorBoardLogger, log_versions
from vis2ir.train.resume import check_resumable, resolve_resume, resume_base, resume_step

log = logging.getLogger(__name__)


def build_trainer(cfg: Config, run_dir: Path, callbacks=(), loggers=True, progress: bool = True,
                  data: dict | None = None, stop: StopRequests | None = None, base: Path | dict | None = None
                  ) -> L.Trainer:
    """The Trainer of a launch: our checkpoints (`data`: the fingerprint their run.json records; `base`: what
    their base.json records, `write_weights`), stops between optimizer steps only (`stop`: the signal flags;
    `train.max_minutes` per launch, not Lightning's Timer)."""
    t = cfg.train
    cuda = torch.cuda.is_available() and t.accelerator != "cpu"
    precision = resolved_precision(cfg, cuda)
    # bf16-true is ours (`prepare_for_training`, `MasterWeights`): bf16 transformer, fp32 adapter and masters;
    # Lightning's own would cast the adapter and the inputs too. So Lightning adds nothing.
    precision = "32-true" if precision == "bf16-true" else precision
    strategy = t.strategy
    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(find_unused_parameters=False)
    elif strategy == "fsdp":
        strategy = ShardedStrategy()
    export = CheckpointExport(cfg, run_dir, data, base)
    stops = StepBoundaryStop(stop or StopRequests(), export.save, None if t.max_minutes is None else t.max_minutes * 60,
                             resume_command(run_dir))
    if loggers is True:
        # One version folder per launch, so a resumed run adds its logs beside the first ones.
        loggers = [StepCSVLogger(run_dir, name="logs"), StepTensorBoardLogger(run_dir, name="tensorboard")]
    bar = [StepProgressBar()] if progress else []
    return L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=precision, max_steps=t.max_steps, max_epochs=-1,
        accumulate_grad_batches=t.accumulate_grad_batches,  # gradients are clipped in on_before_optimizer_step
        log_every_n_steps=t.log_every, val_check_interval=t.val_every * t.accumulate_grad_batches,
        check_val_every_n_epoch=None, limit_val_batches=t.val_batches, num_sanity_val_steps=0,
        default_root_dir=run_dir, logger=loggers,
        callbacks=[export, stops, KeepOptimizerFlags(), StepLogging(), *bar, *callbacks],
        enable_checkpointing=False, use_distributed_sampler=False,  # our StepSampler splits the ranks
        enable_progress_bar=progress, enable_model_summary=False,
    )


def train(cfg: Config, resume: str | None = None, model: Vis2IRModel | None = None, progress: bool = True,
          callbacks=()) -> Path:
    """Train as `cfg` says; returns the run folder.

    With `resume` ('latest', a run folder or a checkpoint folder) it continues that checkpoint; `cfg`
    must then agree with the run's saved settings outside `RESUMABLE` (else `Vis2IRError`, and
    nothing on disk changes); a finished run (at `train.max_steps`) is refused. Without `resume` the
    output folder must hold no checkpoint (no run to mix with). Ctrl-C, SIGTERM and SIGUSR1 stop at the next
    optimizer-step boundary, write that step's checkpoint and raise `KeyboardInterrupt` (Ctrl-C) or
    `signals.Stopped` (exit status 128 + signal). Raises `Vis2IRError` before any model loads for a bad run
    folder, a resume state written by a newer version, or training data changed since the checkpoint.
    """
    if cfg.model.quantize != "none" and cfg.train.finetune == "full":
        raise Vis2IRError(f"model.quantize={cfg.model.quantize} stores the frozen base quantized, so it trains "
                          "with train.finetune=lora only (LoRA on the quantized base); or set model.quantize=none")
    run_dir = Path(cfg.train.output_dir)
    state = resolve_resume(resume, run_dir)
    if state is None:
        check_new_run(run_dir)
    else:
        check_unfinished(state, resume_step(state), cfg.train.max_steps, resume)
    cfg = resolve_init_from(cfg, state)  # the concrete base checkpoint, kept in the run's config.yaml
    check_writable(run_dir, "train.output_dir")  # a read-only folder: one line, before the model loads
    if state is not None:
        check_resumable(cfg, state.parent)
    # the base checkpoint (or a resumed full run's base.json record); a resume checked its own at its first launch
    if state is not None:
        base = resume_base(cfg, state.parent)
    else:
        base = check_init_from(cfg) if cfg.train.init_from else None
    from vis2ir.data.fingerprint import data_fingerprint

    data = data_fingerprint(cfg.data, "train")  # recorded in every checkpoint's run.json
    if state is not None:
        check_resume_identity(state.parent, data, resume)
    if cfg.data.latent_cache:  # a cache that does not fit this run is refused before anything is written
        from vis2ir.latent_cache import LatentCache

        LatentCache(cfg.data.latent_cache, cfg, source=data)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    # Our data order is resumable by construction (StepSampler + Positioned), which Lightning cannot see.
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    # An empty validation split is announced by `split_loader` and means "no validation".
    warnings.filterwarnings("ignore", message=".*Total length of `list` across ranks is zero.*")
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN attention backward crashed on Hopper (docs/design.md §9)
    made = first_missing(run_dir)  # a launch refused before its first step leaves the folders as it found them
    config_before = (run_dir / "config.yaml").read_bytes() if (run_dir / "config.yaml").is_file() else None
    versions = log_versions(run_dir)  # those of earlier launches
    requests = StopRequests()  # installed when training starts
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
        trainer = build_trainer(cfg, run_dir, callbacks=callbacks, progress=progress, data=data, stop=requests,
                                base=base)
        # a resumed full run builds on its own checkpoint (the whole transformer), a LoRA run on its base where it is
        source = state.parent if state and cfg.train.finetune == "full" else base if isinstance(base, Path) else None
        module = Vis2IRModule(cfg, model, start_step=resume_step(state) if state else 0, source=source, data=data)
    except BaseException:
        undo_launch(run_dir, made, config_before, versions)
        raise
    log.info("Training %s for %d steps (batch %d × %d accumulation × %d devices) into %s", cfg.model.semantic.mode,
             cfg.train.max_steps, cfg.train.batch_size, cfg.train.accumulate_grad_batches, trainer.world_size, run_dir)
    if cfg.train.semantic_dropout > 0:
        log.info("train.semantic_dropout=%g: each sample's semantic map is replaced by the all-unknown map with this "
                 "probability (the model learns to go without maps)", cfg.train.semantic_dropout)
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C from its first one on
    try:
        trainer.fit(module, ckpt_path=state, weights_only=True if state else None)
    except BaseException as err:
        if trainer.global_step <= module.start_step:  # failed before its first step: leave nothing new
            undo_launch(run_dir, made, config_before, versions)
        if isinstance(err, SystemExit) and trainer.interrupted:  # Lightning's sys.exit(1) after Ctrl-C
            raise KeyboardInterrupt from None
        if isinstance(err, Stopped):  # a stop signal, after saving the step it finished
            if trainer.is_global_zero:
                log.warning(stop_message(err, trainer.global_step, run_dir, resume_command(run_dir)))
            if err.signum == signal.SIGINT:
                raise KeyboardInterrupt from None
        if isinstance(err, torch.OutOfMemoryError):
            raise out_of_memory("training", cfg, trainer.strategy.root_device) from None
        if cfg.train.compile:
            from vis2ir.speedup import compile_failure

            if (failure := compile_failure(err, "train.compile")) is not None:
                raise failure from None
        raise
    finally:
        requests.restore()
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)
    return run_dir


def first_missing(folder: Path) -> Path | None:
    """The outermost of `folder` and its parents that does not exist (what `folder.mkdir(parents=True)` would
    create first), or None when `folder` exists."""
    missing = None
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing = path
    return missing


def undo_launch(run_dir: Path, made: Path | None, config_before: bytes | None, versions: set[Path]) -> None:
    """After a launch that failed before its first step, leave on disk only what was there before it: remove
    the log versions it added (any not in `versions`, those found before), put `run_dir/config.yaml` back as
    it was (`config_before`; None: there was none), and remove the log folders, and the folders this launch
    created (`run_dir` and its parents up to `made`, from `first_missing`; None: none), when nothing else is
    in them. A folder that existed before keeps everything it had."""
    from vis2ir.files import write_bytes
    from vis2ir.train.progress import LOG_DIRS

    if not run_dir.is_dir():  # failed before making it
        return
    for folder in log_versions(run_dir) - versions:
        shutil.rmtree(folder, ignore_errors=True)
    config = run_dir / "config.yaml"
    if config_before is None:
        config.unlink(missing_ok=True)
    else:
        write_bytes(config, config_before)
    created = []  # run_dir, then its parents, up to `made`
    for folder in (run_dir, *run_dir.parents) if made is not None else ():
        created.append(folder)
        if folder == made:
            break
    for folder in [*(run_dir / name for name in LOG_DIRS), *created]:
        try:
            folder.rmdir()  # only when empty
        except OSError:
            pass
