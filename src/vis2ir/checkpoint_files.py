"""The files of a checkpoint folder, and telling a whole checkpoint from one written or copied incompletely.

Torch-free: readers check a checkpoint before anything heavy loads.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

from vis2ir.errors import Vis2IRError

CONFIG_FILE = "config.yaml"
LORA_FILE = "pytorch_lora_weights.safetensors"
TRANSFORMER_FILE = "transformer.safetensors"
ADAPTER_FILE = "adapter.safetensors"
PROMPT_FILE = "prompt_embeds.safetensors"
RESUME_FILE = "resume.ckpt"
BASE_FILE = "base.json"
MANIFEST_FILE = "files.json"


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


def write_manifest(directory: Path) -> None:
    """Write `files.json` into the finished checkpoint folder `directory`, last: every file's size, and the
    names of the settings in its config.yaml (which may be edited by hand, but not lose settings)."""
    sizes = {p.relative_to(directory).as_posix(): p.stat().st_size
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    try:
        settings = _setting_names(directory / CONFIG_FILE) if (directory / CONFIG_FILE).is_file() else None
    except ValueError:
        settings = None
    (directory / MANIFEST_FILE).write_text(json.dumps({"files": sizes, "settings": settings}, indent=2) + "\n")


def _setting_names(config: Path) -> list[str]:
    """The dotted names of the settings in a config.yaml; ValueError if it is not a YAML mapping."""
    import yaml

    try:
        tree = yaml.safe_load(config.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(str(err)) from None
    if not isinstance(tree, dict):
        raise ValueError("not a mapping")

    def names(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                yield from names(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    return sorted(names(tree))


def _config_problem(config: Path, expected: list[str] | None) -> str | None:
    """Why a config.yaml whose size is not the recorded one is not whole (settings lost), or None (edited)."""
    try:
        names = set(_setting_names(config))
    except ValueError:
        return "is damaged (not a YAML mapping of settings)"
    if expected is None:
        return "is incomplete (its size differs from the one recorded)"
    lost = [name for name in expected if name not in names]
    return f"is incomplete ({len(lost)} of its {len(expected)} settings lost, e.g. {lost[0]})" if lost else None


def _safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file `path` is not whole (its header names more data than the file holds), or None."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length <= 0 or 8 + length > size:
                return "is incomplete (its header is cut off)"
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError):
        return "is damaged (its header is not safetensors)"
    return None if size == 8 + length + end else f"is incomplete ({size:,} of {8 + length + end:,} bytes)"


def size_problem(size: int, recorded: int) -> str:
    """What a file of `size` bytes whose checkpoint recorded `recorded` bytes is, in words: cut short, or changed."""
    if size < recorded:
        return f"is incomplete ({size:,} of {recorded:,} bytes)"
    return f"is {size:,} bytes, the checkpoint recorded {recorded:,} (edited or copied incompletely)"


def checkpoint_problem(directory: Path, resume: bool = False) -> tuple[Path, str] | None:
    """`(file, what is wrong)` when the checkpoint folder `directory` is not whole, else None.

    A checkpoint with `files.json` is whole when every file it lists has the listed size (config.yaml may
    have been edited by hand, but must keep every setting it had: a cut one parses, its last ones lost). Older ones (and
    the shipped ones) are checked file by file: `config.yaml` parses, each weight file its config needs is
    there and holds all the data its header names. With `resume`, `resume.ckpt` must be there and whole."""
    import yaml

    manifest = directory / MANIFEST_FILE
    if manifest.exists():
        try:
            record = json.loads(manifest.read_text())
            sizes, settings = record["files"], record.get("settings")
        except (ValueError, KeyError, TypeError, AttributeError):
            return manifest, "is damaged"
        for name, size in sizes.items():
            if name == RESUME_FILE and not resume:
                continue  # the weights are whole without it (a checkpoint copied for inference)
            path = directory / name
            if not path.exists():
                return path, "is missing"
            if path.stat().st_size == size:
                continue
            if name != CONFIG_FILE:
                return path, size_problem(path.stat().st_size, size)
            if (problem := _config_problem(path, settings)) is not None:  # else edited by hand: fine
                return path, problem
        if resume and RESUME_FILE not in sizes:
            return directory / RESUME_FILE, "is missing"
        return None
    config = directory / CONFIG_FILE
    if not config.exists():
        return config, "is missing"
    try:
        settings = yaml.safe_load(config.read_text())
        train, model = settings.get("train") or {}, settings.get("model") or {}
        mode = (model.get("semantic") or {}).get("mode")
    except (yaml.YAMLError, AttributeError, UnicodeDecodeError):
        return config, "is damaged (not a YAML mapping of settings)"
    needed = [TRANSFORMER_FILE if train.get("finetune") == "full" else LORA_FILE,
              *([ADAPTER_FILE] if mode == "cross_attention" else [])]
    for path in [directory / n for n in needed] + [p for p in directory.glob("*.safetensors") if p.name not in needed]:
        if not path.exists():
            return path, "is missing"
        if (problem := _safetensors_problem(path)) is not None:
            return path, problem
    state = directory / RESUME_FILE
    if resume and not state.exists():
        return state, "is missing"
    if resume and not zipfile.is_zipfile(state):
        return state, "is incomplete (not a whole torch archive)"
    return None


def newest_intact(directory: Path, resume: bool = False) -> str:
    """Where to turn when the checkpoint `directory` is damaged: its run's newest whole checkpoint, in words."""
    if directory.parent.name != "checkpoints":
        return "copy the checkpoint again"
    others = [p for p in list_checkpoints(directory.parent) if p != directory]
    for other in reversed(others):
        if checkpoint_problem(other, resume) is None:
            return f"the newest intact checkpoint of this run is {other}"
    return f"no other checkpoint of {directory.parent.parent} is intact"


def check_intact(directory: str | Path, resume: bool = False) -> None:
    """Raise one line naming the damaged file and the run's newest intact checkpoint unless the checkpoint
    folder `directory` is whole (`checkpoint_problem`): every reader of a checkpoint calls it first."""
    directory = Path(directory)
    found = checkpoint_problem(directory, resume)
    if found is not None:
        path, problem = found
        raise Vis2IRError(f"{path}: {problem}, so {directory} is not a whole checkpoint (written or copied "
                          f"incompletely); {newest_intact(directory, resume)}")


def checkpoint_identity(directory: str | Path) -> str:
    """A cheap fingerprint of a checkpoint's weights: sha256 over each file's name, size and first and last
    MiB (not the resume state). A base that changes under a LoRA trained on it changes its identity."""
    digest = hashlib.sha256()
    directory = Path(directory)
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.name in (RESUME_FILE, MANIFEST_FILE, "run.json"):
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            digest.update(f.read(2**20))
            f.seek(max(0, size - 2**20))
            digest.update(f.read(2**20))
    return digest.hexdigest()
