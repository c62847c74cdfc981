"""Resuming a run: which checkpoint `--resume` means, the settings it runs with, which of them a resume may
change (`RESUMABLE`), and the step it continues from."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vis2ir.checkpoint import (BASE_FILE, RESUME_FILE, check_base, check_intact, checkpoint_path, find_checkpoint,
                               list_checkpoints, load_checkpoint_config)
from vis2ir.config import Config, load_config, role_prefixes
from vis2ir.errors import Vis2IRError


# A resumed run may change only these settings (how long, how often it logs and saves, where); the
# rest say what the run is. Dotted prefixes (`sample.`: the validation grids' settings), derived from the
# roles declared in the schema (role "resumable", `vis2ir.config.roles`); the `train.` ones first, as
# messages list them.
RESUMABLE = tuple(sorted(role_prefixes("resumable"), key=lambda key: not key.startswith("train.")))


def check_resumable(cfg: Config, checkpoint: Path) -> None:
    """Refuse `cfg` if it changes a setting of the run saved in `checkpoint` outside `RESUMABLE`."""
    old, new = load_checkpoint_config(checkpoint).flat(), cfg.flat()
    for key in sorted(new):
        if not key.startswith(RESUMABLE) and old.get(key) != new[key]:
            raise Vis2IRError(
                f"--resume: {key}={new[key]!r} differs from the run's {old.get(key)!r} ({checkpoint / 'config.yaml'}); "
                f"a resumed run keeps its settings except {', '.join(k.rstrip('.') for k in RESUMABLE)} "
                f"(start a new train.output_dir to change it)")


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """`--resume latest` → the newest checkpoint of this run; a folder → its resume state."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise Vis2IRError(f"--resume latest: no checkpoint under {run_dir / 'checkpoints'}")
        folder = found[-1]
    else:
        folder = Path(resume).expanduser()
        if not folder.exists():
            raise Vis2IRError(f"--resume {resume}: no such folder (expected a checkpoint folder or a run folder)")
        found = [] if (folder / RESUME_FILE).exists() else list_checkpoints(folder)
        folder = found[-1] if found else folder
    state = folder / RESUME_FILE
    if not state.exists() and not (folder / "config.yaml").exists() and folder.parent.name != "checkpoints":
        raise Vis2IRError(f"--resume {resume}: {state} not found (expected a checkpoint folder or a run folder)")
    check_intact(folder, resume=True)  # a checkpoint copied incompletely: the damaged file, the newest intact one
    return state


def resume_config(resume: str, path: str | None = None, overrides=()) -> Config:
    """The settings of `vis2ir train --resume`: the run's saved config, with the given config file's
    settings and the overrides put over it (`train` then refuses those that change the run)."""
    if resume == "latest":
        run_dir = Path(load_config(path, overrides).train.output_dir)
    else:
        run_dir = Path(resume)
    state = resolve_resume(resume, run_dir)
    base = load_checkpoint_config(state.parent)
    if state.parent.parent.name == "checkpoints":  # the run it is in, wherever it was launched from
        base.train.output_dir = str(state.parent.parent.parent)
    return load_config(path, overrides, base=base)


def resume_base(cfg: Config, checkpoint: Path) -> Path | dict | None:
    """What a resume of `checkpoint` builds on and records as its base (`train.init_from`): a LoRA run's base
    checkpoint, where it is now (`check_base`: also after its runs folder moved); a full run's base.json record
    as it is (a full checkpoint holds the whole model: its base is not needed, and may be gone); None: no base."""
    if not cfg.train.init_from:
        return None
    if cfg.train.finetune == "full":
        record = checkpoint / BASE_FILE
        if not record.exists():  # written before checkpoints recorded their base
            if checkpoint_path(cfg.train.init_from).exists():
                return find_checkpoint(cfg.train.init_from)
            return {"init_from": cfg.train.init_from, "identity": None}
        try:
            return json.loads(record.read_text())
        except ValueError:
            raise Vis2IRError(f"{record}: is damaged (not JSON); resume from an older checkpoint of the run, "
                              "or copy it again") from None
    return check_base(checkpoint, f"--resume {checkpoint}") or find_checkpoint(cfg.train.init_from)


def resume_step(state: Path) -> int:
    """The optimizer step of the resume state `state` (its folder's name `step-N`, else read from it)."""
    name = state.parent.name
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    ckpt = torch.load(state, map_location="cpu", weights_only=True, mmap=True)  # the step, not the tensors
    return int(ckpt["global_step"])
