"""`vis2ir train`: flow-matching training of LoRA (or the whole transformer) and the adapter, one job a file:

    vis2ir/objective.py  t, x_1, x_t, the target and the loss (below the model: the sampler's tests use it too)
    module.py    the Lightning module: batch → loss, validation      guard.py     the bad-step guard
    optimizer.py parameter groups, AdamW/Prodigy, bf16-true masters   prepare.py   LoRA/full, checkpointing
    loaders.py   the rank's loaders in the resumable data order       progress.py  progress bar, loggers
    export.py    checkpoints and their pruning                        identity.py  a checkpoint's run.json
    control.py   where a launch may start and stops                   resume.py    what `--resume` continues
    run.py       `train`: checks, the Trainer, the fit, stops and failures
"""

from vis2ir.data.order import Positioned, StepSampler
from vis2ir.objective import flow_loss, offset_group, sample_noise, sample_timesteps
from vis2ir.train.control import resume_command
from vis2ir.train.export import CheckpointExport
from vis2ir.train.loaders import split_loader
from vis2ir.train.module import Vis2IRModule
from vis2ir.train.prepare import prepare_for_training, resolved_precision, training_tokens
from vis2ir.train.progress import (LOG_DIRS, StepLogging, StepCSVLogger, StepProgressBar, StepTensorBoardLogger,
                                   log_versions, metrics_logs)
from vis2ir.train.resume import RESUMABLE, check_resumable, resolve_resume, resume_config
from vis2ir.train.run import build_trainer, train

__all__ = [
    "LOG_DIRS", "RESUMABLE", "CheckpointExport", "StepLogging", "Positioned", "StepCSVLogger", "StepProgressBar",
    "StepSampler", "StepTensorBoardLogger", "Vis2IRModule", "build_trainer", "check_resumable", "flow_loss",
    "log_versions", "metrics_logs", "offset_group", "prepare_for_training", "resolve_resume", "resolved_precision",
    "resume_command", "resume_config", "sample_noise", "sample_timesteps", "split_loader", "train", "training_tokens",
]
