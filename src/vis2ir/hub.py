"""Finding weights: a local folder, the local Hub cache, or one quick check of the Hub, no retry loop.

Shared by the FLUX backbone and the panoptic segmenter. `fail(reason)` builds the caller's own one-line
error (naming its setting and how to provide the weights) from a short reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from vis2ir.errors import Vis2IRError, first_line

Fail = Callable[[str], Vis2IRError]


def is_local(path: str) -> bool:
    """Whether `path` means a local folder (it exists, or it cannot be a Hub id `owner/name`)."""
    return Path(path).expanduser().exists() or path.startswith((".", "/", "~")) or path.count("/") != 1


def local_folder(path: str, needed: tuple[str, ...], fail: Fail) -> Path:
    """The local folder `path`, checked to hold every file in `needed`."""
    local = Path(path).expanduser()
    if not local.is_dir():
        raise fail("no such local folder")
    missing = [f for f in needed if not (local / f).exists()]
    if missing:
        raise fail(f"the folder lacks {missing[0]}")
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
                    any_of: tuple[str, ...] = ()) -> Path | None:
    """The local Hub cache's folder of `repo_id` when it holds every file in `needed` (and, given
    `any_of`, a file matching one of those globs, e.g. the weights), else None. No network."""
    from huggingface_hub import snapshot_download

    try:
        root = Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss means: not cached
        return None
    complete = all((root / f).exists() for f in needed)
    return root if complete and (not any_of or any(any(root.glob(g)) for g in any_of)) else None
