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

Folders are written under a temporary name of the writing process (`temp_dir`), fsynced and renamed
into place, so a crash never leaves a half-written checkpoint where a reader would take it for a whole
one, and two runs sharing a folder never delete each other's unfinished checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vis2ir.config import Config, LoraConfig, first_difference, load_config
from vis2ir.errors import Vis2IRError
from vis2ir.files import fsync, temp_path

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
LORA_FILE = "pytorch_lora_weights.safetensors"
TRANSFORMER_FILE = "transformer.safetensors"
ADAPTER_FILE = "adapter.safetensors"
PROMPT_FILE = "prompt_embeds.safetensors"
RESUME_FILE = "resume.ckpt"

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


def write_weights(directory: str | Path, model, cfg: Config, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write config and weights of `model` (a `Vis2IRModel`) into the existing folder `directory`.

    `state`: the model's trained tensors by name, whole (`sharding.trainable_state`, which gathers them
    from FSDP shards); by default the model's own `state_dict()`.
    """
    directory = Path(directory)
    cfg.save(directory / CONFIG_FILE)
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
    """`write_weights` into `directory`, atomically."""
    with atomic_dir(directory) as tmp:
        write_weights(tmp, model, cfg)
    return Path(directory)


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
    """Put the finished folder `tmp` at `final` durably (its files fsynced first, then the parent
    folder after the rename), replacing what was there."""
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
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        replace_dir(self.tmp, self.path)


# ----------------------------------------------------------------------------------------------
# Loading

# Settings that shape the model: a checkpoint only runs (or is fine-tuned) with the values it was trained with.
STRUCTURAL = ("model.backbone", "model.codec", "model.pixel_factor", "model.seed", "model.transformer.",
              "model.vae.", "model.text.", "model.lora.rank", "model.lora.target_modules", "model.semantic.mode",
              "model.semantic.num_layers", "model.semantic.num_heads", "model.semantic.position",
              "model.semantic.rope_", "model.semantic.inject_into", "model.semantic.fusion_alpha", "train.finetune")


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
    keys = tuple(k for k in STRUCTURAL if k != "train.finetune"
                 and not (trained.train.finetune == "full" and k.startswith("model.lora.")))
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
    steps = list_checkpoints(path)
    if not steps:
        raise Vis2IRError(f"{path}: no checkpoint here (expected {CONFIG_FILE} or checkpoints/step-N/)")
    return steps[-1]


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The `step-N` checkpoint folders of a run folder (`run_dir/checkpoints/`), or of its `checkpoints/`
    folder itself, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        root = Path(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def load_checkpoint_config(directory: str | Path, overrides=()) -> Config:
    directory = Path(directory)
    if not (directory / CONFIG_FILE).exists():
        raise Vis2IRError(f"{directory}: not a vis2ir checkpoint (no {CONFIG_FILE})")
    return load_config(directory / CONFIG_FILE, overrides)


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
    model = build_with_weights(directory, cfg, device, dtype)
    log.info("Loaded checkpoint %s", directory)
    return model.eval(), cfg


def build_with_weights(directory: str | Path, cfg: Config, device: torch.device | str = "cpu",
                       dtype: torch.dtype | None = None):
    """The model `cfg` describes, with the weights of the checkpoint `directory` (whose own config
    gives the structure). A full-weights checkpoint under `model.quantize` is loaded in full precision
    on the CPU first and quantized on its way to `device` (weights cannot be loaded into a quantized layer)."""
    import dataclasses

    from vis2ir.backbone import resolve_dtype
    from vis2ir.model import build_model
    from vis2ir.quantize import quantize_transformer

    trained = load_checkpoint_config(directory)
    dtype = dtype or resolve_dtype(cfg.model.dtype, device)
    if trained.train.finetune == "full" and cfg.model.quantize != "none":
        plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantize="none"))
        model = build_model(plain, "cpu", dtype)
        load_weights(directory, model, trained)
        quantize_transformer(model.transformer, cfg.model.quantize, device)
        return model.to(device)
    model = build_model(cfg, device, dtype)
    load_weights(directory, model, trained)
    return model
