"""The identity of a split of the training data, cheap enough to take at every launch (stat only).

`data_fingerprint(cfg.data, split)` is `{"split", "count", "digest", "names"}`: `digest` covers every
sample's name and the identity of its files (relative path, size and modification time of each visible,
infrared, semantic or triptych file; the table files or `datasets` fingerprints of a table source; the
synthesis settings of ThermalScenes); `names` covers the sample names alone, so that a difference can be
told apart as samples added or removed, or files of the same samples changed. Samples are listed by the
data package's own listing (`dataset.open_source`), so they are exactly those the dataset reads. No image
is opened: 100 000 samples take a listing and 300 000 `stat` calls.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from vis2ir.config import DataConfig
from vis2ir.data.splits import SPLITS

FILE_KINDS = ("visible", "infrared", "semantic", "triptych")
_SYNTH_KEYS = ("synth_count", "synth_seed", "val_fraction", "test_fraction")


def _text(value) -> bytes:
    """`value` as bytes; names from `os.listdir` that are not UTF-8 keep their original bytes."""
    return str(value).encode("utf-8", "surrogateescape")


def file_identity(path: str | Path, root: Path | None = None) -> str:
    """`path` (relative to `root` where it lies inside) with its size and modification time in ns, or
    'missing' when it cannot be stat'ed: what tells a changed file without reading it."""
    shown = str(path)
    if root is not None:
        try:
            shown = Path(path).relative_to(root).as_posix()
        except ValueError:
            pass
    try:
        st = os.stat(path)
    except OSError:
        return f"{shown} missing"
    return f"{shown} {st.st_size} {st.st_mtime_ns}"


def sample_identities(data_cfg: DataConfig, split: str) -> dict[str, str]:
    """{sample name: its identity (one line, see `file_identity`)} for every sample of `split`, in the order
    the data package lists them. ThermalScenes' samples are identified by the synthesis settings."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if data_cfg.source == "thermalscenes":
        from vis2ir.data.synth import scene_name, split_indices

        settings = " ".join(f"{k}={getattr(data_cfg, k)}" for k in _SYNTH_KEYS)
        idx = split_indices(data_cfg.synth_count, split, data_cfg.val_fraction, data_cfg.test_fraction)
        return {scene_name(i): f"thermalscenes {settings}" for i in idx}
    from vis2ir.data.dataset import open_source  # the dataset's own listing

    found, reader = open_source(data_cfg)
    records = [r for r in found.records if r.split == split]
    if found.layout == "table":
        table = _table_identity(data_cfg.source, reader)
        return {r.name: f"{table} [{r.table}] row {r.row}" for r in records}
    root = Path(found.root)
    out = {}
    for r in records:
        files = [f"{kind}={file_identity(getattr(r, kind), root)}" for kind in FILE_KINDS if getattr(r, kind)]
        out[r.name] = " ".join(files)
    return out


def sample_contents(data_cfg: DataConfig, split: str, names: set[str] | None = None) -> dict[str, str]:
    """{sample name: a hash of its files' bytes} for the samples of `split` (those in `names` where given):
    what tells a sample whose files were only touched or copied (same bytes) from one that changed. Reads
    the files: for the few samples whose identity changed, or once when a cache is made. A table's or
    ThermalScenes' samples are keyed by their identity (`sample_identities`)."""
    if data_cfg.source == "thermalscenes":
        return {n: k for n, k in sample_identities(data_cfg, split).items() if names is None or n in names}
    from vis2ir.data.dataset import open_source

    found, _ = open_source(data_cfg)
    if found.layout == "table":
        return {n: k for n, k in sample_identities(data_cfg, split).items() if names is None or n in names}
    out = {}
    for r in found.records:
        if r.split != split or (names is not None and r.name not in names):
            continue
        h = hashlib.sha256()
        for kind in FILE_KINDS:
            path = getattr(r, kind)
            if path:
                h.update(kind.encode() + b"\0")
                try:
                    with open(path, "rb") as f:
                        h.update(hashlib.file_digest(f, "sha256").digest())
                except OSError:
                    h.update(b"missing")
        out[r.name] = h.hexdigest()[:32]
    return out


def short_key(identity: str) -> str:
    """A short hash (16 hex digits) of a sample's identity line, as a latent cache stores it."""
    return hashlib.sha256(_text(identity)).hexdigest()[:16]


def _table_identity(source: str, reader) -> str:
    """A table source's identity: its files (path, size, mtime) where it is on disk, and the `datasets`
    fingerprints of its tables (which change with their content for a Hub data set)."""
    path = Path(source).expanduser()
    parts = []
    if path.is_dir():
        parts += [file_identity(p, path) for p in sorted(path.rglob("*")) if p.is_file()]
    elif path.is_file():
        parts.append(file_identity(path))
    else:
        import glob

        parts += [file_identity(p) for p in sorted(glob.glob(str(path), recursive=True))]
    for key, table in sorted(getattr(reader, "tables", {}).items()):
        parts.append(f"{key}:{getattr(table, '_fingerprint', '')}")
    return hashlib.sha256(_text("\n".join(parts))).hexdigest()[:16]


def digest_of(identities: dict[str, str]) -> tuple[str, str]:
    """(digest of names and identities, digest of the names alone) of `sample_identities`' result."""
    full, names = hashlib.sha256(), hashlib.sha256()
    for name, identity in identities.items():
        full.update(_text(name) + b"\t" + _text(identity) + b"\n")
        names.update(_text(name) + b"\n")
    return full.hexdigest(), names.hexdigest()


def data_fingerprint(data_cfg: DataConfig, split: str) -> dict:
    """The fingerprint of `split` of `data_cfg.source`: {"split": str, "count": int (samples), "digest": hex
    (names and file identities), "names": hex (names alone)}. Stat only, no image read.

    Raises `DataError` (a `Vis2IRError`) where the source cannot be listed (no such folder, ...)."""
    identities = sample_identities(data_cfg, split)
    digest, names = digest_of(identities)
    return {"split": split, "count": len(identities), "digest": digest, "names": names}


def describe_difference(old: dict, new: dict) -> str:
    """In a few words, what differs from fingerprint `old` (then) to `new` (now): the split, the number of
    samples, the sample names, or the files of the same samples; '' when they are the same."""
    said = []
    if old.get("split") != new.get("split"):
        said.append(f"split {old.get('split')!r} then, {new.get('split')!r} now")
    if old.get("count") != new.get("count"):
        said.append(f"{old.get('count')} samples then, {new.get('count')} now")
    elif old.get("names") and new.get("names") and old["names"] != new["names"]:
        said.append(f"the same number of samples ({new.get('count')}) but other names (added and removed)")
    if not said and old.get("digest") != new.get("digest"):
        if old.get("names") and old.get("names") == new.get("names"):
            said.append("files of the same samples changed (size or modification time)")
        else:
            said.append("the samples or their files changed")
    return "; ".join(said)
