"""`vis2ir data cache`: a training split's latents on disk, so that training skips the codec.

The codec is frozen, so the latent inputs of a sample (`x_0`, `x_cond`, semantic tokens) never
change: encode them once, store them in safetensors shards, and train from them with
`data.latent_cache=DIR`. With `data.hflip`, both orientations are stored and a sample's flip is
drawn as the image dataset draws it, so a cached run sees what an uncached one would.

What every sample shares is stored once: the Fill mask's channels of `x_cond` (the target panel is
always the masked one), and of the semantic tokens `[semantic | semantic]` only the first half. With
FLUX's VAE that is 160 values per token instead of 448 (x_0 64, x_cond 64 + 256 mask, semantic 64).

The folder records the settings its latents depend on, its split, and each sample's source files (size and
modification time, and a hash of their bytes): a training run whose settings differ is refused with the
first differing key, a cache of another split is refused, and so is a cache whose source changed since
(samples changed, added or removed), each in one line with the command that makes it again. The check at
every launch is a listing and a `stat` per file; only files whose size or time changed are read (a copy
with new times but the same bytes is still the same data).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from einops import rearrange, repeat
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vis2ir.config import Config, first_difference, role_prefixes
from vis2ir.errors import Vis2IRError
from vis2ir.latents import image_ids, token_grid
from vis2ir.model import Encoded, encode_batch
from vis2ir.files import atomic_write, write_text
from vis2ir.io.runtime import default_device
from vis2ir.semantic.modes import NEEDS_SEMANTIC, num_panels

log = logging.getLogger(__name__)

META_FILE = "meta.json"
FORMAT = 4  # 1: x_cond with its mask channels and both semantic halves, per sample; 2: one panel shape;
# 3: without the source's identity
KEYS = ("x_0", "x_cond", "semantic_tokens")
MASK_KEY = "x_cond_mask"  # the mask channels of x_cond `[N, 4s²]`, the same for every sample
SHARD_SIZE = 256  # samples per shard at most; a shard holds one panel shape (aspect-ratio bucket)


# The settings that decide a sample's latents (dotted-key prefixes), derived from the roles declared in the
# schema (role "latent", `vis2ir.config.roles`).
LATENT_SETTINGS = role_prefixes("latent")
DATA_SETTINGS = role_prefixes("data")  # the settings that decide which samples a split holds (recorded too)


def fingerprint(cfg: Config) -> dict:
    """The settings that decide a sample's latents, by dotted key."""
    return {k: v for k, v in cfg.flat().items() if k.startswith(LATENT_SETTINGS)}


def data_settings(cfg: Config) -> dict:
    """The settings that decide which samples a split holds (`DATA_SETTINGS`), by dotted key."""
    return {k: v for k, v in cfg.flat().items() if k.startswith(DATA_SETTINGS)}


@torch.no_grad()
def build_latent_cache(cfg: Config, out: str | Path, split: str = "train", batch_size: int = 16,
                       device: str | torch.device | None = None) -> Path:
    """Encode every sample of `split` (both orientations with `data.hflip`) into `out`."""
    from vis2ir.backbone import load_codec
    from vis2ir.files import check_writable

    check_writable(out, "data cache --out")  # before the codec loads
    from vis2ir.data import build_dataset

    if cfg.data.resize_policy == "random_crop":
        raise Vis2IRError("data.resize_policy=random_crop: a random crop cannot be cached; use bucket, resize or center_crop")
    out = Path(out)
    device = default_device(device)
    codec = load_codec(cfg.model, device)
    flips = cfg.data.hflip and split == "train"
    data_cfg = dataclasses.replace(cfg.data, hflip=False)
    dataset = build_dataset(data_cfg, split, require_semantic=cfg.model.semantic.mode in NEEDS_SEMANTIC)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # an older cache here is never read half rewritten
    written: list[Path] = []
    try:
        _write_shards(cfg, out, split, dataset, codec, device, batch_size, flips, written)
    except BaseException:  # a full disk (one line from `atomic_write`), Ctrl-C, …: leave nothing partial
        for path in written:
            path.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    return out


def _write_shards(cfg: Config, out: Path, split: str, dataset, codec, device, batch_size: int, flips: bool,
                  written: list[Path]) -> None:
    """The shards of `dataset`, then `meta.json` (last: it makes the folder a cache), into `out`; each path
    is appended to `written` once it exists."""
    from vis2ir.data import collate
    from vis2ir.data.buckets import group

    shapes = dataset.shapes
    names: list[str] = [""] * len(dataset)
    shards, shard_shapes, shard_rows, locations = [], [], [], [[0, 0] for _ in range(len(dataset))]
    chunks = [(shape, idx[k:k + SHARD_SIZE]) for shape, idx in group(shapes).items()
              for k in range(0, len(idx), SHARD_SIZE)]  # one panel shape per shard
    for shape, chunk in tqdm(chunks, desc=f"caching {split} latents", unit="shard"):
        tensors: dict[str, list[torch.Tensor]] = {}
        mask = rows = None
        for b in range(0, len(chunk), batch_size):
            batch = collate([dataset[i] for i in chunk[b:b + batch_size]])
            for j, (i, name) in enumerate(zip(chunk[b:b + batch_size], batch["name"])):
                names[i], locations[i] = name, [len(shards), b + j]
            on_device = {k: batch[k].to(device) for k in ("visible", "infrared", "semantic") if k in batch}
            for flipped in (False, True) if flips else (False,):
                images = {k: v.flip(-1) for k, v in on_device.items()} if flipped else on_device
                enc = encode_batch(codec, cfg.model.semantic, images["visible"], images["infrared"],
                                   images.get("semantic"))
                rows = token_grid(codec, enc.height, enc.width)[0]
                mask = enc.x_cond[0, :, enc.x_0.shape[-1]:] if mask is None else mask  # on the device
                for key, value in compact(enc, mask, rows).items():
                    tensors.setdefault(key + ("_flip" if flipped else ""), []).append(value.cpu())
        name = f"shard-{len(shards):05d}.safetensors"
        shard = {k: torch.cat(v).contiguous() for k, v in tensors.items()} | {MASK_KEY: mask.cpu().contiguous()}
        atomic_write(out / name, lambda tmp, shard=shard: save_file(shard, str(tmp)))
        written.append(out / name)
        shards.append(name)
        shard_shapes.append(list(shape))
        shard_rows.append(rows)
    source = _source_keys(cfg, split, set(names))
    meta = {"format": FORMAT, "fingerprint": fingerprint(cfg), "split": split, "count": len(names), **source,
            "data_settings": data_settings(cfg),  # what decides the split's samples: a change is named
            "names": names, "shards": shards, "shard_shapes": shard_shapes, "token_rows": shard_rows,
            "locations": locations, "flips": flips}
    write_text(out / META_FILE, json.dumps(meta))
    written.append(out / META_FILE)
    log.info("Cached %d %s samples%s in %s (%d panel shapes)", len(names), split,
             " (both orientations)" if flips else "", out, len(set(map(tuple, shard_shapes))))


def _source_keys(cfg: Config, split: str, cached: set[str]) -> dict:
    """What the cache records of its source: `source` (the split's `data_fingerprint`), `identities` (each
    listed sample's `short_key`) and `contents` (each cached sample's `sample_contents`)."""
    from vis2ir.data.fingerprint import digest_of, sample_contents, sample_identities, short_key

    identities = sample_identities(cfg.data, split)
    digest, names = digest_of(identities)
    return {"source": {"split": split, "count": len(identities), "digest": digest, "names": names},
            "identities": {n: short_key(v) for n, v in identities.items()},
            "contents": sample_contents(cfg.data, split, cached)}


def cache_command(path: str | Path, cfg: Config, split: str = "train") -> str:
    """A command to paste that makes a cache of `split` with `cfg`'s settings into a new folder beside `path`
    (its name with `_<split>` in place of a split suffix, e.g. `cache_test` -> `cache_train`, or `_new`): the
    settings the latents and the split depend on are given as overrides where they are not the defaults."""
    import shlex

    import yaml

    from vis2ir.config import load_config

    defaults = load_config(None, []).flat()
    mine = {k: v for k, v in cfg.flat().items() if k.startswith(LATENT_SETTINGS + DATA_SETTINGS)}
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix('...').strip()}"
                 for k, v in mine.items() if v != defaults.get(k)]
    return shlex.join(["vis2ir", "data", "cache", "--split", split, "--out", str(new_folder(path, split)), *overrides])


def new_folder(path: str | Path, split: str) -> Path:
    """A folder beside cache `path` for a new cache of `split` (`cache_test` -> `cache_train`, `c` -> `c_train`,
    `c_train` -> `c_train_new`)."""
    path = Path(path)
    base = path.name
    for old in ("train", "val", "test"):
        base = base.removesuffix(f"_{old}").removesuffix(f"-{old}")
    return path.with_name(f"{base}_{split}" if f"{base}_{split}" != path.name else f"{path.name}_new")


def rebuild_help(path: str | Path, cfg: Config, split: str = "train") -> str:
    """The way out of a cache that does not fit this run: make one that does, and train from it."""
    import shlex

    return (f"make a cache that fits this run with: {cache_command(path, cfg, split)} ; then train with "
            f"data.latent_cache={shlex.quote(str(new_folder(path, split)))}")


def check_source(path: str | Path, meta: dict, cfg: Config, split: str = "train", source: dict | None = None
                 ) -> None:
    """Refuse (`Vis2IRError`, one line) a cache of another split than `split`, or whose source samples
    changed, were added or removed since it was made. Cheap: a listing and a `stat` per file; only files
    whose size or time changed are read, to tell a copy (same bytes) from a change. `source`: the split's
    `data_fingerprint` as the caller computed it this launch; when its digest is the cache's, nothing is listed."""
    from vis2ir.data.errors import DataError
    from vis2ir.data.fingerprint import digest_of, sample_contents, sample_identities, short_key
    from vis2ir.io.inputs import printable

    made = meta.get("split")
    if made != split:
        raise Vis2IRError(f"data.latent_cache={path}: a cache of the {made!r} split, but training reads the "
                          f"{split!r} split; {rebuild_help(path, cfg, split)}")
    if source is not None and source.get("digest") == meta["source"]["digest"]:
        return
    try:
        now = sample_identities(cfg.data, split)
    except DataError as err:  # the images are gone or moved: the cache is all there is
        log.warning("data.latent_cache=%s: its source cannot be checked (%s); training from the cached latents "
                    "as they are", path, err)
        return
    if digest_of(now)[0] == meta["source"]["digest"]:
        return
    recorded = meta.get("data_settings") or {}  # caches made before the settings were recorded have none
    settings = data_settings(cfg)
    for key, made in sorted(recorded.items()):
        mine = settings.get(key, made)
        if key != "data.source" and mine != made:  # the source's path may differ for a copy: its samples tell
            raise Vis2IRError(f"data.latent_cache={path}: made with {key}={made!r}, but this run has {mine!r}, which "
                              f"changes the samples of the {split!r} split; set {key}={made!r} back to train from "
                              f"this cache, or {rebuild_help(path, cfg, split)}")
    then: dict[str, str] = meta["identities"]
    keys = {n: short_key(v) for n, v in now.items()}
    added = [n for n in keys if n not in then]
    removed = [n for n in then if n not in keys]
    touched = {n for n in keys if n in then and keys[n] != then[n]}
    contents = meta["contents"]
    same = sample_contents(cfg.data, split, touched & contents.keys()) if touched else {}
    changed = sorted(n for n in touched if n not in contents or same.get(n) != contents[n])
    if not (added or removed or changed):
        log.info("data.latent_cache=%s: %d source samples have new file times but the same bytes", path, len(touched))
        return
    said = [f"{len(x)} {what} (e.g. {printable(sorted(x)[0])})" for x, what in
            ((changed, "changed"), (added, "added"), (removed, "removed")) if x]
    raise Vis2IRError(f"data.latent_cache={path}: its source {cfg.data.source} changed since the cache was made: "
                      f"{', '.join(said)} samples of the {split!r} split; {rebuild_help(path, cfg, split)}")


def compact(enc: Encoded, mask: torch.Tensor, rows: int) -> dict[str, torch.Tensor]:
    """What a batch stores: `x_0`, `x_cond` without its mask channels (checked to equal `mask`, the
    first sample's), and the first half of each of the `rows` rows of semantic tokens."""
    width = enc.x_0.shape[-1]
    mask_channels = enc.x_cond[..., width:]
    if not torch.equal(mask_channels, mask.expand_as(mask_channels)):
        raise Vis2IRError("the Fill mask differs between samples; this cache format needs one mask for all")
    out = {"x_0": enc.x_0, "x_cond": enc.x_cond[..., :width]}
    if enc.semantic_tokens is not None:
        halves = rearrange(enc.semantic_tokens, "b (r n c) d -> b n (r c) d", r=rows, n=2)
        if not torch.equal(halves[:, 0], halves[:, 1]):
            raise Vis2IRError("the semantic tokens' halves differ; this cache format stores one")
        out["semantic_tokens"] = halves[:, 0]
    return out


class LatentCache(Dataset):
    """Samples `{x_0, x_cond, semantic_tokens?, name}` from a cache folder, checked against `cfg` (its latent
    settings) and against the source's `split` as it is now (`check_source`; `source`: that split's
    `data_fingerprint`, when the caller has it already, spares a second listing of the source when nothing
    changed); `Vis2IRError` when they differ."""

    def __init__(self, path: str | Path, cfg: Config, split: str = "train", source: dict | None = None):
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.exists():
            raise Vis2IRError(f"data.latent_cache={path}: no {META_FILE} (make one with `vis2ir data cache`)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise Vis2IRError(f"data.latent_cache={path}: made in cache format {self.meta.get('format', 1)}, "
                              f"but this vis2ir reads format {FORMAT}; {rebuild_help(path, cfg, split)}")
        from vis2ir.config.migrate import move_renamed_flat

        self.meta["fingerprint"] = move_renamed_flat(self.meta["fingerprint"])  # made by an older vis2ir
        diff = first_difference(fingerprint(cfg), self.meta["fingerprint"], LATENT_SETTINGS)
        if diff:
            key, mine, made = diff
            raise Vis2IRError(f"data.latent_cache={path}: made with {key}={made!r}, but this run has {mine!r}; set "
                              f"{key}={made!r} back to train from this cache, or {rebuild_help(path, cfg, split)}")
        check_source(path, self.meta, cfg, split, source)
        self.flips = self.meta["flips"]
        self._files: dict[str, object] = {}
        self._masks: dict[str, torch.Tensor] = {}  # each shard's x_cond mask channels

    def __len__(self) -> int:
        return self.meta["count"]

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Each sample's panel (width, height), as the image dataset gave it."""
        return [tuple(self.meta["shard_shapes"][shard]) for shard, _ in self.meta["locations"]]

    def __getitem__(self, i: int) -> dict:
        # Drawn first, as the image datasets draw their flip, so positions map to the same choice.
        flipped = self.flips and bool(torch.rand(()) < 0.5)
        shard, row = self.meta["locations"][i]
        f = self._open(self.meta["shards"][shard])
        w, h = self.meta["shard_shapes"][shard]
        sample = {"name": self.meta["names"][i], "panel_size": (h, w)}
        for key in KEYS:
            stored = key + ("_flip" if flipped else "")
            if stored in f.keys():
                sample[key] = f.get_slice(stored)[row]
        sample["x_cond"] = torch.cat([sample["x_cond"], self._masks[self.meta["shards"][shard]]], dim=-1)
        if "semantic_tokens" in sample:  # the map describes both halves: [semantic | semantic]
            rows = self.meta["token_rows"][shard]
            sample["semantic_tokens"] = repeat(sample["semantic_tokens"], "(r c) d -> (r n c) d", r=rows, n=2)
        return sample

    def _open(self, name: str):
        if name not in self._files:  # per process: DataLoader workers open their own handles
            self._files[name] = safe_open(str(self.path / name), framework="pt")
            self._masks[name] = self._files[name].get_tensor(MASK_KEY)
        return self._files[name]


def to_encoded(batch: dict, codec, cfg: Config) -> Encoded:
    """A collated batch of cached samples as the model's `Encoded` inputs."""
    h, w = batch["panel_size"][0]  # one shape per batch
    w = w * num_panels(cfg.model.semantic.mode)
    ids = image_ids(*token_grid(codec, h, w), device=batch["x_0"].device)
    return Encoded(batch["x_0"], batch["x_cond"], ids, batch.get("semantic_tokens"), h, w)
