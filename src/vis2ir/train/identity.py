"""A checkpoint's run identity, `run.json`, written into every training checkpoint before it is published:

    {"vis2ir_version": "0.1.0", "state_format": 2, "step": N,
     "data": data_fingerprint(cfg.data, "train"), "base": cfg.train.init_from}

`state_format` numbers the contents of `resume.ckpt` and is raised whenever they change, so that a
resume meets a state it cannot continue in one line, never in a library's assertion. Formats:

    0  before 2026-11-30 (vis2ir 0.1.0 up to commit 68fc6f7): AdamW's param groups say `fused: None`, which
       this version's fused AdamW took over on load; the next step failed in torch's AdamW with
       "AssertionError: Expected grad_scale and found_inf to be None"; no run.json
    1  commit dec29c7 to 214e404: fused AdamW, bf16-true masters; no run.json
    2  run.json beside resume.ckpt; the step-boundary loop state

Formats 0 and 1 resume exactly: the optimizer's implementation flags are this version's own
(`KeepOptimizerFlags`), the rest of the state is read as it was. A `resume.ckpt` of a newer format is
refused, naming both versions. The data fingerprint is compared on resume (`check_resume_identity`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L

from vis2ir import __version__
from vis2ir.errors import Vis2IRError

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
STATE_FORMAT = 2
OPTIMIZER_FLAGS = ("fused", "foreach", "capturable", "differentiable")  # how, not what, an optimizer computes


def run_identity(step: int, data: dict | None, base: str | None, state_format: int = STATE_FORMAT) -> dict:
    """The contents of `run.json` for the checkpoint of `step` (`data`: `data_fingerprint(cfg.data, "train")`,
    `base`: `train.init_from` as resolved at the run's first launch, or None)."""
    return {"vis2ir_version": __version__, "state_format": state_format, "step": step, "data": data, "base": base}


def write_run_identity(folder: str | Path, identity: dict) -> Path:
    """Write `run.json` into the checkpoint folder `folder` while it is still unpublished (a temporary name:
    the checkpoint writer fsyncs and renames the whole folder). Raises `OSError` (a full disk) as the
    checkpoint's other files do, for the writer to report in one line."""
    path = Path(folder) / RUN_FILE
    path.write_text(json.dumps(identity, indent=2) + "\n")
    return path


def read_run_identity(folder: str | Path) -> dict | None:
    """The `run.json` of checkpoint folder `folder`, or None when it has none (written before format 2).
    Raises `Vis2IRError` naming the file when it cannot be read as a run identity."""
    path = Path(folder) / RUN_FILE
    try:
        identity = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise Vis2IRError(f"{path}: cannot read this checkpoint's run identity ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); the checkpoint was copied incompletely or "
                          f"damaged: resume from an older checkpoint of the run, or copy it again") from None
    if not isinstance(identity, dict) or not isinstance(identity.get("state_format"), int):
        raise Vis2IRError(f"{path}: expected a JSON object with an integer state_format (a vis2ir run identity); "
                          f"resume from an older checkpoint of the run, or copy it again")
    return identity


def legacy_state_format(state: str | Path) -> int:
    """The state format of a `resume.ckpt` written before run.json: 1 when its AdamW was fused, else 0.
    Memory-maps the file: the optimizer's tensors are not read."""
    import torch

    ckpt = torch.load(state, map_location="cpu", weights_only=True, mmap=True)
    groups = [g for opt in ckpt.get("optimizer_states", ()) for g in opt.get("param_groups", ())]
    return 1 if any(g.get("fused") for g in groups) else 0


def check_resume_identity(checkpoint: str | Path, data_now: dict | None, resume: str) -> dict | None:
    """Check that this version can continue the checkpoint folder `checkpoint` exactly, on the same data.

    `data_now`: this launch's `data_fingerprint(cfg.data, "train")` (None: not checked). Returns the
    checkpoint's run identity (None for formats 0 and 1, which have none). Raises `Vis2IRError` in one line
    for a state written by a newer version, or training data that changed since the checkpoint."""
    from vis2ir.data.fingerprint import describe_difference

    checkpoint = Path(checkpoint)
    identity = read_run_identity(checkpoint)
    if identity is None:
        fmt = legacy_state_format(checkpoint / "resume.ckpt")
        log.info("%s was written by vis2ir 0.1.0 before run identities (state format %d); resuming it with state "
                 "format %d (its training data cannot be checked: no fingerprint)", checkpoint, fmt, STATE_FORMAT)
        return None
    fmt, version = identity["state_format"], identity.get("vis2ir_version", "?")
    if fmt > STATE_FORMAT:
        raise Vis2IRError(f"--resume {resume}: {checkpoint / RUN_FILE} was written with state format {fmt} by a "
                          f"newer vis2ir{'' if version == __version__ else f' ({version})'} than this one "
                          f"({__version__}, state format {STATE_FORMAT}): upgrade vis2ir to resume it, or start a new "
                          f"run from its weights: vis2ir train train.init_from={checkpoint} "
                          f"train.output_dir=NEW_FOLDER")
    old = identity.get("data")
    if data_now is not None and old and (said := describe_difference(old, data_now)):
        raise Vis2IRError(f"--resume {resume}: the training data changed since {checkpoint} ({said}; fingerprint in "
                          f"{checkpoint / RUN_FILE}), so the run cannot continue exactly; put the data back as it "
                          f"was, or start a new run from these weights: vis2ir train train.init_from={checkpoint} "
                          f"train.output_dir=NEW_FOLDER")
    return identity


class KeepOptimizerFlags(L.Callback):
    """After a resume, give every optimizer's param groups this version's implementation flags (`fused`,
    `foreach`, ...): torch's `load_state_dict` takes them from the saved groups, so a state saved by a
    non-fused AdamW (state format 0) made the fused one of this version fail on its first step. What the
    optimizer computes (moments, step counts, learning rates) stays as saved; the step counts go where the
    fused or capturable kernels want them (as torch's own loading would put them: float32, the parameter's
    device)."""

    def on_train_start(self, trainer, module) -> None:
        import torch

        for optimizer in trainer.optimizers:
            defaults = getattr(optimizer, "defaults", {})
            for group in optimizer.param_groups:
                for key in OPTIMIZER_FLAGS:
                    if key in defaults:
                        group[key] = defaults[key]
                if not (group.get("fused") or group.get("capturable")):
                    continue
                for p in group["params"]:
                    step = optimizer.state.get(p, {}).get("step")
                    if torch.is_tensor(step) and (step.device != p.device or step.dtype != torch.float32):
                        optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)
