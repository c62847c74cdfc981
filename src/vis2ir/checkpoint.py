"""One way to save and load a trained model: a checkpoint folder.

    step-N/
      config.yaml                        the full Config the model was trained with
      pytorch_lora_weights.safetensors   LoRA (train.finetune: lora), diffusers layout: a stock
                                         `FluxFillPipeline.load_lora_weights(dir)` loads it
      transformer.safetensors            the whole transformer (train.finetune: full)
      adapter.safetensors                the semantic cross-attention adapter (mode cross_attention)
      prompt_embeds.safetensors          the constant prompt embeddings the model was trained with
                                         (random text encoders differ between library versions)
      resume.ckpt                        optimizer, step and RNG state for `--resume` (training only)
      base.json                          the checkpoint `train.init_from` named, and its identity
      files.json                         every file's size, written last: a reader tells a checkpoint
                                         copied incompletely from a whole one (`check_intact`)

Folders are written under a temporary name of the writing process (`temp_dir`), fsynced and renamed
into place, so a crash never leaves a half-written checkpoint where a reader would take it for a whole
one, and two runs sharing a folder never delete each other's unfinished checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vis2ir.config import Config, LoraConfig, first_difference, load_config, role_prefixes
from vis2ir.errors import Vis2IRError
from vis2ir.checkpoint_files import (ADAPTER_FILE, BASE_FILE, CONFIG_FILE, LORA_FILE, PROMPT_FILE, TRANSFORMER_FILE,
                                     check_intact, checkpoint_identity, list_checkpoints, newest_intact, write_manifest)
from vis2ir.checkpoint_files import MANIFEST_FILE, RESUME_FILE, checkpoint_problem  # noqa: F401 (their home until now)
from vis2ir.files import fsync, io_error, ordinary_mode, temp_path, write_error

log = logging.getLogger(__name__)


# Checkpoints shipped inside the package, by the name that stands for them wherever a checkpoint folder
# is asked for (`train.init_from: demo`, `--checkpoint demo`, `Vis2IRPipeline.from_checkpoint("demo")`).
# A folder of that name in the working directory is written `./demo`. `demo` is mode channel_concat,
# `demo_cross_attention` the cross-attention adapter (docs/demo.md).
SHIPPED = {name: Path(__file__).parent / "assets" / name for name in ("demo", "demo_cross_attention")}


# ----------------------------------------------------------------------------------------------
# LoRA


def add_lora(transformer: torch.nn.Module, cfg: LoraConfig) -> None:
    """Attach a peft LoRA adapter to the transformer (frozen base, trainable LoRA)."""
    from peft import LoraConfig as PeftLoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
        init_lora_weights="gaussian" if cfg.init == "gaussian" else True,
    ))


# ----------------------------------------------------------------------------------------------
# Saving


def write_weights(directory: str | Path, model, cfg: Config, state: dict[str, torch.Tensor] | None = None,
                  base: Path | dict | None = None) -> None:
    """Write config and weights of `model` (a `Vis2IRModel`) into the existing folder `directory`.

    `state`: the model's trained tensors by name, whole (`sharding.trainable_state`, which gathers them
    from FSDP shards); by default the model's own `state_dict()`. `base`: the checkpoint folder that
    `cfg.train.init_from` names, where it is now (by default looked up by that name), or the base.json record
    to keep (a resumed full run's: its base is not needed, and may be gone).
    """
    directory = Path(directory)
    cfg.save(directory / CONFIG_FILE)
    if cfg.train.init_from:  # the base the weights sit on (LoRA) or started from (full), as `resolve_init_from` left it
        record = base if isinstance(base, dict) else None
        if record is None:
            base = Path(base) if base is not None else find_checkpoint(cfg.train.init_from)
            record = {"init_from": cfg.train.init_from, "identity": checkpoint_identity(base)}
            if cfg.train.init_from not in SHIPPED:  # found again where a runs folder moved whole (`check_base`)
                record["relative"] = os.path.relpath(base.absolute(), directory.absolute())
        (directory / BASE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    dtype = getattr(torch, cfg.train.save_dtype)
    state = model.state_dict() if state is None else state
    transformer = _part(state, "transformer.")
    if cfg.train.finetune == "lora":
        _save_lora(directory, model.transformer, transformer, cfg.model.lora, dtype)
    else:
        save_file(_plain(transformer, dtype), str(directory / TRANSFORMER_FILE))
    if model.adapter is not None:
        save_file(_plain(_part(state, "adapter."), dtype), str(directory / ADAPTER_FILE))
    save_file(_plain({"prompt_embeds": model.prompt_embeds, "pooled_prompt_embeds": model.pooled_prompt_embeds},
                     torch.float32), str(directory / PROMPT_FILE))


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `state` under `prefix`, named without it (a sub-module's state dict)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def save_weights(directory: str | Path, model, cfg: Config) -> Path:
    """`write_weights` into `directory`, atomically (a full disk: one-line `Vis2IRError`, nothing left)."""
    with atomic_dir(directory) as tmp:
        write_weights(tmp, model, cfg)
    return Path(directory)


def checkpoint_size(model, cfg: Config) -> int:
    """About how many bytes a training checkpoint of `model` takes: the trainable weights in
    `train.save_dtype`, and in the resume state fp32 copies with two optimizer moments."""
    width = torch.finfo(getattr(torch, cfg.train.save_dtype)).bits // 8
    return sum(p.numel() * (width + 12) for p in model.parameters() if p.requires_grad)


def failed_save(tmp: Path, final: Path, err: BaseException | None, needed: int | None = None) -> BaseException:
    """What to raise for a checkpoint that could not be written to `final` (`err`: what rank 0 met; None on the
    other ranks), after deleting its temporary folder `tmp`, so nothing partial stays: a one-line `Vis2IRError`
    for a failed write (`files.io_error`: a full disk, an unwritable folder), else `err` itself (a bug)."""
    shutil.rmtree(tmp, ignore_errors=True)
    if err is None:
        return Vis2IRError(f"{final}: the first process could not write this checkpoint (its message says why)")
    failed = io_error(err)
    return err if failed is None else write_error(final.parent, failed, final.name, needed)


_IN_PLACE_IO = None


def save_resume_state(trainer, path: Path) -> None:
    """`trainer.save_checkpoint(path)` (optimizer, step, RNG) written straight into `path`, which lies in
    the checkpoint's own temporary folder (what makes the save atomic). Lightning's own writer stages the
    file in the system temp folder (fsspec's transaction, `tempfile.mkstemp`): a small /tmp broke saving
    and the file came out 0600."""
    global _IN_PLACE_IO
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    if _IN_PLACE_IO is None:
        class InPlaceCheckpointIO(TorchCheckpointIO):
            def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
                with open(path, "wb") as f:
                    torch.save(checkpoint, f)

        _IN_PLACE_IO = InPlaceCheckpointIO
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = _IN_PLACE_IO()
    trainer.save_checkpoint(path, weights_only=False)


def _save_lora(directory: Path, transformer, state: dict[str, torch.Tensor], cfg: LoraConfig,
               dtype: torch.dtype) -> None:
    """The LoRA tensors of the transformer's `state` in diffusers' layout."""
    from diffusers import FluxFillPipeline
    from peft import get_peft_model_state_dict

    # peft keys; `save_lora_weights` adds diffusers' `transformer.` prefix
    lora = _plain(get_peft_model_state_dict(transformer, state_dict=state), dtype)
    metadata = {"r": cfg.rank, "lora_alpha": cfg.alpha, "target_modules": cfg.target_modules}
    FluxFillPipeline.save_lora_weights(directory, transformer_lora_layers=lora, transformer_lora_adapter_metadata=metadata)


def _plain(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """CPU, contiguous copies; floating tensors cast to `dtype` when given."""
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in state.items()}


def temp_dir(final: str | Path) -> Path:
    """A new temporary folder name beside `final` that only this process uses (host, pid, random part).
    Temporary folders left by dead processes of this host for the same `final` are deleted; another
    live process's are never touched."""
    final = Path(final)
    host = socket.gethostname().replace("-", "_")
    if final.parent.is_dir():
        for old in final.parent.glob(f".{final.name}.tmp@{host}-*"):
            pid = old.name.rsplit("-", 2)[-2]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
    return temp_path(final, f"tmp@{host}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (and `folder`), so a rename publishes complete data."""
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):  # files and sub-folders first
        fsync(path)
    fsync(folder)


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` at `final` durably (its files given an ordinary file's permissions,
    `ordinary_mode`, and fsynced first, then the parent folder after the rename), replacing what was there."""
    for path in tmp.rglob("*"):
        os.chmod(path, ordinary_mode(path.is_dir()))
    fsync_tree(tmp)
    old = temp_path(final, "old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


class atomic_dir:
    """`with atomic_dir(path) as tmp:` write into `tmp` (a `temp_dir` name); on success it replaces
    `path` whole and durably, on failure `tmp` is deleted."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = temp_dir(self.path)

    def __enter__(self) -> Path:
        try:
            self.tmp.mkdir(parents=True)
        except OSError as err:
            raise write_error(self.path.parent, err, self.path.name) from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            try:
                write_manifest(self.tmp)
                replace_dir(self.tmp, self.path)
                return
            except Exception as err:
                exc = err
        shutil.rmtree(self.tmp, ignore_errors=True)
        if (failed := io_error(exc)) is not None:  # a full disk, an unwritable folder: one line
            raise write_error(self.path.parent, failed, self.path.name) from None
        if exc_type is None:
            raise exc  # a failure of the manifest or the rename that is not a write error
        # anything else raised in the block goes on as it is


# ----------------------------------------------------------------------------------------------
# Loading

# Settings that shape the model: a checkpoint only runs (or is fine-tuned) with the values it was trained with.
# Dotted prefixes, derived from the roles declared in the schema (role "model", `vis2ir.config.roles`).
STRUCTURAL = role_prefixes("model")


def check_compatible(trained: Config, cfg: Config, directory: Path, where: str, keys=STRUCTURAL) -> None:
    """Fail if `cfg` changes a setting under `keys` (mode, codec, sizes) from the checkpoint's `trained`."""
    diff = first_difference(trained.flat(), cfg.flat(), keys)
    if diff:
        key, old, new = diff
        raise Vis2IRError(f"{where}: {key}={new!r} differs from the checkpoint's {old!r} "
                          f"({directory / CONFIG_FILE}); a checkpoint runs with the model settings it was trained with")


def check_init_from(cfg: Config) -> Path:
    """The checkpoint `train.init_from` names, after checking that `cfg` builds the model it holds: the
    structural settings must agree, except `train.finetune` (a full checkpoint can be fine-tuned with LoRA,
    then with any `model.lora` settings). Raises `Vis2IRError` naming the first setting that differs."""
    source = find_checkpoint(cfg.train.init_from)
    trained = load_checkpoint_config(source)
    keys = tuple(k for k in STRUCTURAL if k != "train.finetune"  # a LoRA source is merged for full training
                 and not ("full" in (trained.train.finetune, cfg.train.finetune) and k.startswith("model.lora.")))
    check_compatible(trained, cfg, source, f"train.init_from={cfg.train.init_from}", keys)
    return source



def checkpoint_path(path: str | Path) -> Path:
    """`path` as a folder: a shipped checkpoint's name ('demo', `SHIPPED`) gives its folder in the package."""
    return SHIPPED.get(path, Path(path)) if isinstance(path, str) else Path(path)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, a run folder or a run's `checkpoints/` folder (the
    newest `step-N` of the latter two), or the name of a shipped checkpoint (`SHIPPED`: 'demo'). A path
    that does not exist, or holds no checkpoint, is a one-line `Vis2IRError` saying so."""
    path = checkpoint_path(path).expanduser()
    if not path.exists():
        raise Vis2IRError(f"{path}: no such folder, so no checkpoint here (expected a checkpoint folder, a run "
                          "folder or its checkpoints/)")
    if (path / CONFIG_FILE).exists() and not (path / "checkpoints").is_dir():
        return path
    if path.parent.name == "checkpoints" and path.name[5:].isdigit() and path.name.startswith("step-"):
        return path  # a run's checkpoint that lost its config: `load_checkpoint_config` says so
    steps = list_checkpoints(path)
    if not steps:
        raise Vis2IRError(f"{path}: no checkpoint here (expected {CONFIG_FILE} or checkpoints/step-N/)")
    return steps[-1]


def load_checkpoint_config(directory: str | Path, overrides=()) -> Config:
    """The Config a checkpoint folder was trained with (`overrides` put over it), after `check_intact`."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).exists() and not (directory / MANIFEST_FILE).exists() \
            and directory.parent.name != "checkpoints":
        raise Vis2IRError(f"{directory}: not a vis2ir checkpoint (no {CONFIG_FILE})")
    check_intact(directory)
    return load_config(directory / CONFIG_FILE, overrides)


def run_config(config, checkpoint, overrides=()) -> Config:
    """The settings of a generate or translate run, without building the model: a checkpoint's (a checkpoint or
    run folder, `overrides` over them) when there is one, else those of `config` (a file, or None: the defaults)."""
    if checkpoint:
        return load_checkpoint_config(find_checkpoint(checkpoint), overrides)
    return load_config(config, overrides)


def check_base(directory: Path, where: str | None = None, moved_to: str | None = None) -> Path | None:
    """The checkpoint that the checkpoint `directory` was trained from (`train.init_from`, as recorded in
    its `base.json`), after checking it is still there and unchanged; None when it records none.

    It is looked for at the recorded path, then at the recorded path relative to `directory` (a runs folder
    moved or copied whole), then at `moved_to` (a `train.init_from=NEW_PLACE` override: a checkpoint, run or
    checkpoints/ folder); the first with the recorded identity is it. A gone or changed base is a one-line
    `Vis2IRError` naming it and the ways out."""
    record = directory / BASE_FILE
    if not record.exists():
        return None
    try:
        base = json.loads(record.read_text())
        name, identity, relative = base["init_from"], base["identity"], base.get("relative")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise Vis2IRError(f"{record}: is damaged; {newest_intact(directory)}") from None
    where = where or str(directory)
    places = [checkpoint_path(name)] + ([directory / relative] if isinstance(relative, str) else [])
    if moved_to and checkpoint_path(moved_to).exists():
        places.append(find_checkpoint(moved_to))
    found = [p for p in places if (p / CONFIG_FILE).exists()]
    for source in found:
        if checkpoint_identity(source) == identity:
            return source
    if found:
        raise Vis2IRError(f"{where}: trained on the checkpoint {name} (train.init_from, {record}), which has "
                          f"changed since ({found[-1]} is not it); put the original back (its weights are what this "
                          "one builds on)")
    raise Vis2IRError(f"{where}: trained on the checkpoint {name} (train.init_from, {record}), which is gone; "
                      "put it back where it was, or name its new place with train.init_from=NEW_PLACE"
                      + (f" ({moved_to} is not there)" if moved_to else ""))


def resolve_init_from(cfg: Config, resume: Path | None = None) -> Config:
    """`cfg` with `train.init_from` made concrete, for a run's config.yaml: the checkpoint folder it names
    (a run folder's newest `step-N`), as an absolute path, or the shipped name ('demo'). A resume (`resume`:
    its resume state) never looks the base up again: it keeps the run's own value (also when the config
    file names the same folder relatively) and checks that base is unchanged (`check_base`)."""
    import dataclasses

    value = cfg.train.init_from
    if not value:
        return cfg
    if resume is not None:
        trained = load_checkpoint_config(resume.parent).train
        saved = trained.init_from
        if saved and value != saved and checkpoint_path(value).exists() \
                and find_checkpoint(value).resolve() == checkpoint_path(saved).resolve():
            value = saved  # the same base, written another way
        if value == saved and trained.finetune != "full":  # a full checkpoint holds all it needs: no base
            check_base(resume.parent, f"--resume {resume.parent}")
    elif value not in SHIPPED:
        value = str(find_checkpoint(value).resolve())
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=value))


def merge_lora(transformer: torch.nn.Module) -> None:
    """Fold a LoRA adapter into the transformer's own weights and remove it (full training from a LoRA
    checkpoint: the checkpoints written are then whole transformers, as `load_model` expects)."""
    if getattr(transformer, "peft_config", None):
        transformer.fuse_lora(lora_scale=1.0)
        transformer.unload_lora()


def load_weights(directory: str | Path, model, cfg: Config) -> None:
    """Load a checkpoint's weights into a freshly built `Vis2IRModel` of the same config.

    Every file must hold exactly the tensors, of the shapes, that the model built from `cfg` has:
    a missing, extra or misshapen tensor raises `Vis2IRError` naming the file and the first of them.
    """
    directory = Path(directory)
    if cfg.train.finetune == "lora":
        lora = directory / LORA_FILE
        if not lora.exists():
            raise Vis2IRError(f"{lora}: missing (the checkpoint was trained with train.finetune=lora)")
        _load_lora(directory, model.transformer, cfg.model.lora)
    else:
        path = directory / TRANSFORMER_FILE
        if not path.exists():
            raise Vis2IRError(f"{path}: missing (the checkpoint was trained with train.finetune=full)")
        _load_strict(model.transformer, path)
    prompt = directory / PROMPT_FILE
    if prompt.exists():
        tensors = load_file(str(prompt))
        buffers = {name: getattr(model, name) for name in ("prompt_embeds", "pooled_prompt_embeds")}
        check_fit(prompt, tensors, buffers, "model.max_sequence_length or the text widths differ")
        for name, buffer in buffers.items():
            buffer.copy_(tensors[name].to(buffer.dtype))
    if model.adapter is not None:
        path = directory / ADAPTER_FILE
        if not path.exists():
            raise Vis2IRError(f"{path}: missing (mode cross_attention needs the trained adapter)")
        _load_strict(model.adapter, path)


def check_fit(path: Path, got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], hint: str = "") -> None:
    """Raise one line naming `path` and the first missing, extra or misshapen tensor (with their counts)
    unless `got` has exactly the names and shapes of `expected`."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if tuple(got[k].shape) != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(expected)} tensors missing, e.g. {missing[0]}")
    if extra:
        problems.append(f"{len(extra)} unexpected, e.g. {extra[0]}")
    if wrong:
        problems.append(f"{len(wrong)} of the wrong shape, e.g. {wrong[0]}: {list(got[wrong[0]].shape)} instead of "
                        f"{list(expected[wrong[0]].shape)}")
    if problems:
        raise Vis2IRError(f"{path}: does not fit the model built from its config ({'; '.join(problems)})"
                          + (f"; {hint}" if hint else ""))


def _load_lora(directory: Path, transformer, cfg: LoraConfig) -> None:
    """Load our LoRA file the way a stock FluxFillPipeline does (`load_lora_weights`), after checking
    that it holds exactly the LoRA tensors that `cfg` puts on this transformer."""
    from diffusers import FluxFillPipeline
    from peft import get_peft_model_state_dict

    state, metadata = FluxFillPipeline.lora_state_dict(str(directory), return_lora_metadata=True)
    with torch.device("meta"):  # the LoRA that `cfg` adds, as shapes only: no memory, no compute
        skeleton = type(transformer).from_config(transformer.config)
        add_lora(skeleton, cfg)
    expected = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(skeleton).items()}
    check_fit(directory / LORA_FILE, state, expected, "model.lora settings or the model differ")
    alpha = (metadata or {}).get("transformer.lora_alpha", cfg.alpha)
    if float(alpha) != float(cfg.alpha):
        raise Vis2IRError(f"{directory / LORA_FILE}: made with lora_alpha={alpha}, its config says "
                          f"model.lora.alpha={cfg.alpha}")
    FluxFillPipeline.load_lora_into_transformer(state, None, transformer=transformer, adapter_name="default",
                                                metadata=metadata)


def _load_strict(module: torch.nn.Module, path: Path) -> None:
    state = load_file(str(path))
    mine = module.state_dict()
    check_fit(path, state, mine)
    module.load_state_dict({k: v.to(mine[k].dtype) for k, v in state.items()})


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               overrides=()):
    """`(model, config)` from a checkpoint folder or a run folder (its newest checkpoint)."""
    directory = find_checkpoint(path)
    cfg = load_checkpoint_config(directory, overrides)
    saved = load_checkpoint_config(directory).train.init_from
    moved_to = cfg.train.init_from if cfg.train.init_from != saved else None  # the base's new place, if overridden
    model = build_with_weights(directory, cfg, device, dtype, moved_to)
    log.info("Loaded checkpoint %s", directory)
    return model.eval(), cfg


def build_with_weights(directory: str | Path, cfg: Config, device: torch.device | str = "cpu",
                       dtype: torch.dtype | None = None, moved_to: str | None = None):
    """The model `cfg` describes, with the weights of the checkpoint `directory` (whose own config
    gives the structure; `moved_to`: where its base is now, `check_base`). A full-weights checkpoint under
    `model.quantize` is loaded in full precision
    on the CPU first and quantized on its way to `device` (weights cannot be loaded into a quantized layer)."""
    import dataclasses

    from vis2ir.backbone import resolve_dtype
    from vis2ir.model import build_model
    from vis2ir.quantize import quantize_transformer

    directory = Path(directory)
    trained = load_checkpoint_config(directory)
    base = lora_base(directory, trained, moved_to)
    dtype = dtype or resolve_dtype(cfg.model.dtype, device)
    full = trained.train.finetune == "full"
    if (full or base is not None) and cfg.model.quantize != "none":
        plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantize="none"))
        model = build_model(plain, "cpu", dtype)
        if base is not None:
            load_weights(base, model, load_checkpoint_config(base))
        if full:
            load_weights(directory, model, trained)
        quantize_transformer(model.transformer, cfg.model.quantize, device)
        model = model.to(device)
        if not full:
            load_weights(directory, model, trained)
        return model
    model = build_model(cfg, device, dtype)
    if base is not None:
        load_weights(base, model, load_checkpoint_config(base))
    load_weights(directory, model, trained)
    return model


def lora_base(directory: Path, trained: Config, moved_to: str | None = None) -> Path | None:
    """The full checkpoint whose transformer the LoRA checkpoint `directory` sits on, or None (a full
    checkpoint, or LoRA on the backbone). A LoRA trained from a full checkpoint sits on it; one trained from
    another LoRA checkpoint sits on that one's base. A gone or changed base: one line naming it (`check_base`)."""
    if trained.train.finetune != "lora" or not trained.train.init_from:
        return None
    source = check_base(directory, moved_to=moved_to)
    if source is None:  # written before checkpoints recorded their base: look it up as named
        source = find_checkpoint(trained.train.init_from)
        log.warning("%s: records no identity of its base %s; assuming it is unchanged", directory, source)
    else:
        source = find_checkpoint(source)
    source_cfg = load_checkpoint_config(source)
    return source if source_cfg.train.finetune == "full" else lora_base(source, source_cfg)
