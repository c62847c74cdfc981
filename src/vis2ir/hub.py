"""Finding weights: a local folder, the local Hub cache, or one quick check of the Hub, no retry loop.

Shared by the FLUX backbone and the panoptic segmenter. `fail(reason)` builds the caller's own one-line
error (naming its setting and how to provide the weights) from a short reason. A folder counts only
when its weights are there too (`weights_problem`): config files without weights are what an
interrupted download leaves.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from vis2ir.errors import Vis2IRError, first_line

log = logging.getLogger(__name__)

Fail = Callable[[str], Vis2IRError]
WEIGHT_GLOBS = ("*.safetensors", "*.bin")


def weights_problem(root: Path, folders: tuple[str, ...]) -> str | None:
    """Why the weights under `root` are incomplete, or None. Each of `folders` ('.' for `root` itself)
    must hold a weights file (`*.safetensors` or `*.bin`), and every shard that an index file
    (`*.index.json`) names."""
    for name in folders:
        folder = root / name
        prefix = "" if name in (".", "") else f"{name}/"
        for index in sorted(folder.glob("*.index.json")):
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return f"{prefix}{index.name} cannot be read"
            missing = [f for f in shards if not (folder / f).is_file()]
            if missing:
                return f"{prefix}{missing[0]} is missing (one of the {len(shards)} files {index.name} names)"
        if not any(p.is_file() for g in WEIGHT_GLOBS for p in folder.glob(g)):
            return f"{prefix or 'the folder'} has no weights file, *.safetensors or *.bin"
    return None


def is_local(path: str) -> bool:
    """Whether `path` means a local folder (it exists, or it cannot be a Hub id `owner/name`)."""
    return Path(path).expanduser().exists() or path.startswith((".", "/", "~")) or path.count("/") != 1


def local_folder(path: str, needed: tuple[str, ...], fail: Fail, weights: tuple[str, ...] = ()) -> Path:
    """The local folder `path`, checked to hold every file in `needed` and complete weights in each
    of the sub-folders `weights` (`weights_problem`)."""
    local = Path(path).expanduser()
    if not local.is_dir():
        raise fail("no such folder")
    missing = [f for f in needed if not (local / f).exists()]
    if missing:
        raise fail(f"the folder lacks {missing[0]}")
    problem = weights_problem(local, weights)
    if problem:
        raise fail(f"the folder's weights are incomplete: {problem}")
    return local


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def check_hub(repo_id: str, fail: Fail) -> None:
    """Fail fast unless `repo_id` can be downloaded: offline mode, gated, missing, or no network."""
    if hub_offline():
        raise fail("not in the local Hub cache and HF_HUB_OFFLINE is set")
    from huggingface_hub import auth_check
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        auth_check(repo_id)  # one quick request, no retries: tells gated / missing / offline apart
    except GatedRepoError:
        raise fail("access is gated and this account has not been granted it") from None
    except RepositoryNotFoundError:
        raise fail("no such repository on the Hub (or it is private)") from None
    except HfHubHTTPError as err:
        raise fail(f"the Hub answered {first_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - network errors come from several libraries
        raise fail(f"the Hub cannot be reached ({first_line(err)})") from None


def cached_snapshot(repo_id: str, needed: tuple[str, ...], allow_patterns: list[str] | None = None,
                    weights: tuple[str, ...] = (), fail: Fail | None = None) -> Path | None:
    """The local Hub cache's folder of `repo_id` when it holds every file in `needed` and complete
    weights in each of the sub-folders `weights` (`weights_problem`), else None. No network.

    A copy with the files but not the weights (an interrupted download) is not taken: it is logged
    and None returned, so the caller downloads again; offline (HF_HUB_OFFLINE) `fail` says so instead.
    """
    from huggingface_hub import snapshot_download

    try:
        root = Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss means: not cached
        return None
    if not all((root / f).exists() for f in needed):
        return None
    problem = weights_problem(root, weights)
    if problem is None:
        return root
    reason = (f"the local Hub cache holds an incomplete copy ({problem} in {root}; an interrupted "
              f"download): run `hf download {repo_id}` again")
    if fail is not None and hub_offline():
        raise fail(reason)
    log.warning("%s: %s; downloading it again", repo_id, reason.replace(f": run `hf download {repo_id}` again", ""))
    return None
