"""The one dataset: samples of a split from any source, shaped for the model, and its loader.

A sample is a dict: `visible`, `infrared` (grey replicated to 3 channels) and, when used, `semantic`,
each float `[3, H, W]` in [0, 1] (`[3, size, size]`, or the sample's aspect-ratio bucket with
`data.resize_policy: bucket`: `shapes`); `name` (str); `classes` (long `[H, W]`, the shape of
`visible`: `[size, size]` or the bucket's; palette class ids) for ThermalScenes or when asked for. A
sample that stands in for unreadable ones (with `data.on_bad_sample: skip`) also has `skipped`, the
list of what it replaced; `collate` gathers those and `make_loader`'s loader logs their count at the
end of each epoch.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info
from tqdm.auto import tqdm

from vis2ir.config import DataConfig
from vis2ir.data import buckets, coverage
from vis2ir.data.errors import DataError
from vis2ir.data.folders import FileReader, Found, Record, detect_layout, find_folder
from vis2ir.data.images import Normaliser, check_panels, close_panels, crop_box, decode_panel
from vis2ir.palette import decode_classes
from vis2ir.data.splits import SPLITS
from vis2ir.data.synth import ThermalScenes
from vis2ir.data.tables import TableReader, find_table, is_table
from vis2ir.errors import Vis2IRError
from vis2ir.files import name_problem
from vis2ir.io.boxes import BoxLabels, open_for
from vis2ir.io.inputs import missing_maps_help

log = logging.getLogger(__name__)


def open_source(cfg: DataConfig) -> tuple[Found, FileReader | TableReader]:
    """Find every sample of `cfg.source` (a folder layout or a table) and a reader for them."""
    if cfg.layout == "table" or (cfg.layout == "auto" and is_table(cfg.source)):
        return _check_names(*find_table(cfg))
    root = Path(cfg.source).expanduser()
    if not root.is_dir():
        raise DataError(f"{cfg.source}: no such folder (data.source takes a folder, parquet files, a "
                        "`datasets` folder or Hub id, or 'thermalscenes')")
    layout = detect_layout(root) if cfg.layout == "auto" else cfg.layout
    found = find_folder(root, layout, cfg.semantic_dir, cfg.val_fraction, cfg.test_fraction)
    if cfg.semantic_source == "boxes":
        labels = box_source(cfg, found)
        return _check_names(found, FileReader(root / cfg.semantic_dir, labels))
    return _check_names(found, FileReader(root / cfg.semantic_dir))


def no_boxes_in_thermalscenes(cfg: DataConfig) -> None:
    """ThermalScenes come with full semantic maps and no boxes: `semantic_source: boxes` there is a `DataError`.
    Checked with the data, not the settings: `data inspect SOURCE` gives its source after them."""
    if cfg.source == "thermalscenes" and cfg.semantic_source == "boxes":
        raise DataError("data.semantic_source=boxes: ThermalScenes (data.source=thermalscenes) come with full "
                        "semantic maps and no boxes; give data.source=YOUR_FOLDER, or data.semantic_source=files")


def box_source(cfg: DataConfig, found: Found) -> BoxLabels:
    """`data.semantic_source: boxes`: the annotations of `cfg.boxes`, each record's semantic "file" its annotation
    file (what the data fingerprint sees change); `io.boxes.open_for` checks them against the records."""
    if found.layout == "triptych":
        raise DataError(f"{cfg.source}: data.semantic_source=boxes draws maps for paired layouts; triptychs carry "
                        "their own semantic panel (data.semantic_source=files)")
    try:
        labels = open_for(cfg.boxes, [r.name for r in found.records], cfg.box_classes)
    except Vis2IRError as err:
        raise DataError(str(err)) from None
    found.records = [replace(r, semantic=str(labels.source(r.name) or labels.path)) for r in found.records]
    return labels


def _check_names(found: Found, reader):
    """Samples whose names could not name an output file inside its folder (`files.name_problem`:
    `../x`, an absolute path, ...) become problems, named, and are left out."""
    good = []
    for r in found.records:
        problem = name_problem(r.name)
        if problem is None:
            good.append(r)
            continue
        where = r.visible or r.triptych or f"{found.root} [{r.table}] row {r.row}"
        found.problems.append(f"{where}: sample name {r.name!r} {problem} (names become output file names "
                              "and must stay inside the output folder)")
    found.records = good
    return found, reader


def build_dataset(cfg: DataConfig, split: str, require_semantic: bool | None = None,
                  with_classes: bool = False, empty_ok: bool = False) -> Dataset:
    """The dataset of `split` ('train', 'val' or 'test') of `cfg.source`.

    `require_semantic`: True when the model needs semantic maps (missing ones are an error), False
    to leave them out, None to include them when every sample has one. `with_classes` adds the class
    map decoded from the semantic colours (ThermalScenes always has it). Pairing problems and
    unreadable files are found here, before any epoch, as far as file headers tell. A split with no
    samples raises `DataError`, or with `empty_ok` gives an empty dataset (a small set's val split).
    """
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if cfg.source == "thermalscenes":
        no_boxes_in_thermalscenes(cfg)
        return ThermalScenes.split_of(cfg, split, semantic=require_semantic is not False, empty_ok=empty_ok)
    found, reader = open_source(cfg)
    records = [r for r in found.records if r.split == split]
    if not records and empty_ok:
        return PanelDataset([], reader, cfg, split, semantic=None)
    if not records:
        counts = Counter(r.split for r in found.records)
        raise DataError(f"{cfg.source}: no samples in split {split!r} ({found.layout} layout; "
                        + ", ".join(f"{s}: {counts[s]}" for s in SPLITS) + ")")
    problems = list(found.problems)
    if found.skipped:
        log.warning("%s: %s", found.root, found.skipped)
    if cfg.semantic_source == "auto" and require_semantic is not False:
        records = _auto_semantic(cfg, found, reader, records, problems)
    semantic, lacking = _use_semantic(cfg, found, reader, records, require_semantic)
    if with_classes and not semantic:
        raise DataError(f"{cfg.source}: class maps need semantic maps, and this source has none; "
                        + maps_help(cfg, found))
    if lacking:
        where = found.root / cfg.semantic_dir
        if cfg.on_bad_sample == "error":
            raise DataError(f"{found.no_map(lacking[0], where)} ({len(lacking)} of {len(records)} "
                            f"samples of split {split!r} lack one); {maps_help(cfg, found)}; or "
                            "data.on_bad_sample=skip leaves those samples out")
        log.warning("%d of %d samples of split %r have no semantic map in %s and are left out; %s", len(lacking),
                    len(records), split, where, maps_help(cfg, found))
        problems += [found.no_map(r, where) for r in lacking]
        records = [r for r in records if r.semantic is not None]
    sizes: list | None = [] if cfg.resize_policy == "bucket" else None
    if isinstance(reader, FileReader) or sizes is not None:
        records = scan(records, reader, semantic, problems, desc=f"checking {split} files", sizes=sizes)
    _report(cfg, problems)
    if not records:
        raise DataError(f"{cfg.source}: every sample of split {split!r} is bad (see the warnings above)")
    if semantic:  # maps that are mostly VOID (drawn from boxes): not an error, but the model learns little
        void = _mostly_void(cfg, records, reader, f"{cfg.source} (split {split})")
        if void:
            log.warning("%s", void)
    return PanelDataset(records, reader, cfg, split, semantic=semantic, classes=with_classes, sizes=sizes)


def _mostly_void(cfg: DataConfig, records: list[Record], reader, where: str) -> str | None:
    """`coverage.shares_of` up to `coverage.CHECKS` of `records` (spread over them), their maps decoded small
    (`coverage.THUMB` pixels): one line when they are mostly unlabelled, else None."""
    m = min(coverage.CHECKS, len(records))
    if m == 0:
        return None
    picked = [records[k * len(records) // m] for k in range(m)]
    small = replace(cfg, size=coverage.THUMB, hflip=False, resize_policy="resize")
    data = PanelDataset(picked, reader, small, "val", semantic=True)
    return coverage.shares_of(data.load, len(picked), where)


def scan(records: list[Record], reader, semantic: bool, problems: list[str], desc: str,
         sizes: Counter | list | None = None) -> list[Record]:
    """Open every record's files (headers only) and check them (`check_panels`); bad ones go to `problems`,
    visible panel sizes (upright width, height) are counted in `sizes` (a Counter) or listed, one per good
    record (a list)."""
    good = []
    for record in tqdm(records, desc=desc, unit="sample", leave=False, disable=len(records) < 500):
        try:
            panels = reader.open(record, semantic)
            try:
                check_panels(panels)
                if isinstance(sizes, list):
                    sizes.append(panels["visible"].size)
                elif sizes is not None:
                    sizes[panels["visible"].size] += 1
            finally:
                close_panels(panels)
        except DataError as err:
            problems.append(str(err))
            continue
        good.append(record)
    return good


class PanelDataset(Dataset):
    """Samples of one split: panels decoded, cropped and resized alike, flipped alike in training.

    `shapes[i]`: sample i's panel (width, height): `(size, size)`, or with `resize_policy: bucket` its
    aspect-ratio bucket (`data.buckets`), from `sizes`, the records' upright image sizes (read from the
    file headers when not given)."""

    def __init__(self, records: list[Record], reader, cfg: DataConfig, split: str, semantic: bool | None,
                 classes: bool = False, sizes: list[tuple[int, int]] | None = None):
        self.records, self.reader, self.split = records, reader, split
        self.size, self.policy = cfg.size, cfg.resize_policy
        if self.policy == "bucket":
            self.shapes = buckets.assign(sizes if sizes is not None else [self._size(r) for r in records],
                                         cfg.size, cfg.max_aspect)
        else:
            self.shapes = [(cfg.size, cfg.size)] * len(records)
        self.flip = cfg.hflip and split == "train"
        self.skip = cfg.on_bad_sample == "skip"
        self.normaliser = Normaliser.of(cfg)
        self.semantic, self.classes = semantic, classes
        self._bad: dict[int, str] = {}  # this process's known-bad samples and why

    def __len__(self) -> int:
        return len(self.records)

    def use_shapes(self, shapes: list[tuple[int, int]]) -> None:
        """Read sample i at `shapes[i]` (width, height) from now on: a small aspect-ratio bucket merged into
        the nearest shape (`data.buckets.merge_small`), its panels cropped to that shape's aspect."""
        if len(shapes) != len(self.records):
            raise ValueError(f"{len(shapes)} shapes for {len(self.records)} samples")
        self.shapes = list(shapes)

    def _size(self, record: Record) -> tuple[int, int]:
        panels = self.reader.open(record, False)
        try:
            return panels["visible"].size
        finally:
            close_panels(panels)

    def __getitem__(self, index: int) -> dict:
        skipped: list[str] = []
        for step in range(len(self.records)):
            i = (index + step) % len(self.records)
            if self.shapes[i] != self.shapes[index]:  # a stand-in keeps the batch's shape
                continue
            if i not in self._bad:
                try:
                    sample = self.load(i)
                except DataError as err:
                    if not self.skip:
                        raise
                    log.warning("skipping a bad sample: %s", err)
                    self._bad[i] = str(err)
                else:
                    if skipped:
                        sample["skipped"] = skipped
                    return sample
            skipped.append(self._bad[i])
        raise DataError(f"split {self.split!r}: no sample could be read (first: {skipped[0]})")

    def load(self, i: int) -> dict:
        """Sample `i`, or a `DataError` naming the file that could not be read."""
        record = self.records[i]
        panels = self.reader.open(record, self.semantic)
        try:
            check_panels(panels)
            shape = self.shapes[i]
            box = crop_box(panels["visible"].size, self.policy, random=self.split == "train",
                           aspect=shape[0] / shape[1])
            flip = self.flip and bool(torch.rand(()) < 0.5)
            sample: dict = {kind: decode_panel(p, kind, box, shape, self.normaliser, flip)
                            for kind, p in panels.items()}
        finally:
            close_panels(panels)
        sample["name"] = record.name
        if self.classes:
            sample["classes"] = decode_classes(sample["semantic"])
        return sample


def collate(samples: list[dict]) -> dict:
    """Stack tensors, list the rest (names); gather `skipped` from every sample."""
    batch = {}
    for key in samples[0]:
        if key != "skipped":
            values = [s[key] for s in samples]
            batch[key] = _stack(values) if isinstance(values[0], torch.Tensor) else values
    skipped = [item for s in samples for item in s.get("skipped", ())]
    if skipped:
        batch["skipped"] = skipped
    return batch


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack a batch: in a loader worker as torch does (straight into shared memory, one thread);
    in the main process with numpy, as torch's parallel copy stalls for milliseconds on busy cores."""
    if get_worker_info() is not None or not all(t.device.type == "cpu" and not t.requires_grad for t in tensors):
        return default_collate(tensors)
    return torch.from_numpy(np.stack([t.numpy() for t in tensors]))


class SkipReportingLoader(DataLoader):
    """A DataLoader that logs, at the end of each epoch, how many bad samples were skipped."""

    def __iter__(self):
        skipped: list[str] = []
        iterator = super().__iter__()
        try:
            for batch in iterator:
                skipped += batch.get("skipped", []) if isinstance(batch, dict) else []
                yield batch
        except Exception:
            # Stop the workers now: left to garbage collection after an error, torch waits 5 s for them.
            getattr(iterator, "_shutdown_workers", lambda: None)()
            raise
        if skipped:
            log.warning("this epoch skipped %d bad samples (data.on_bad_sample=skip), e.g. %s",
                        len(skipped), skipped[0])


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0,
                **kwargs) -> DataLoader:
    """A DataLoader with `collate`, reporting skipped samples per epoch (kwargs go to DataLoader).

    A dataset whose samples come in several `shapes` (aspect-ratio buckets) is batched one shape per
    batch (`ShapeBatches`), unless a `sampler` is given (training's resumable order does it itself)."""
    kwargs.setdefault("persistent_workers", num_workers > 0)
    shapes = getattr(dataset, "shapes", None)
    if "sampler" not in kwargs and shapes is not None and len(set(shapes)) > 1:
        batches = ShapeBatches(shapes, batch_size, shuffle, kwargs.pop("drop_last", False))
        return SkipReportingLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate,
                                   **kwargs)
    return SkipReportingLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                               collate_fn=collate, **kwargs)


class ShapeBatches(Sampler[list[int]]):
    """Batches of sample indices of one shape each: grouped by shape in index order (`shuffle`: both
    the indices within each shape and the batches shuffled anew each epoch, from torch's RNG)."""

    def __init__(self, shapes: list[tuple[int, int]], batch_size: int, shuffle: bool = False, drop_last: bool = False):
        self.shapes, self.batch_size, self.shuffle, self.drop_last = shapes, batch_size, shuffle, drop_last

    def _batches(self) -> list[list[int]]:
        out = []
        for idx in buckets.group(self.shapes).values():
            if self.shuffle:
                idx = [idx[int(j)] for j in torch.randperm(len(idx))]
            out += [idx[k:k + self.batch_size] for k in range(0, len(idx), self.batch_size)
                    if not self.drop_last or k + self.batch_size <= len(idx)]
        return [out[int(j)] for j in torch.randperm(len(out))] if self.shuffle else out

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        b = self.batch_size
        return sum(len(i) // b if self.drop_last else -(-len(i) // b) for i in buckets.group(self.shapes).values())


def _use_semantic(cfg: DataConfig, found: Found, reader, records: list[Record],
                  require: bool | None) -> tuple[bool, list[Record]]:
    """Whether samples carry semantic maps, and the records that lack a required one."""
    if require is False:
        return False, []
    if isinstance(reader, TableReader):
        if require and not reader.has_semantic:
            raise DataError(f"{cfg.source}: no semantic column {cfg.semantic_column!r} (data.semantic_column); "
                            f"the semantic mode needs semantic maps: {maps_help(cfg, found)}")
        return reader.has_semantic, []
    missing = [r for r in records if r.semantic is None and r.triptych is None]
    if require is None:
        return not missing, []
    if len(missing) == len(records):
        refused = next((r for r in missing if r.name in found.map_problems), None)  # maps there, but not taken
        if refused is not None:
            raise DataError(f"{found.no_map(refused, found.root / cfg.semantic_dir)} (no sample here has a semantic "
                            f"map); the semantic mode needs them: {maps_help(cfg, found)}")
        raise DataError(f"{found.root / cfg.semantic_dir}: no semantic maps for this data (expected "
                        f"<name>.png there, named like the visible images); the semantic mode needs them: "
                        f"{maps_help(cfg, found)}")
    return True, missing


# The folder of visible images whose relative paths are the sample names, per layout (others: none).
_VISIBLE_DIRS = {"paired": "visible", "llvip": "visible", "m3fd": "Vis"}


def maps_help(cfg: DataConfig, found: Found) -> str:
    """The ways out of missing semantic maps for this source (`io.inputs.missing_maps_help`), with the
    `vis2ir segment` command that writes them where the source looks for them."""
    if found.layout == "table":  # maps are made for folders: convert first
        return (f"write the table out as folders (`vis2ir data convert {cfg.source} --out DIR`) and "
                + missing_maps_help("DIR/visible", "DIR/semantic", recursive=True)
                + " (data.semantic_source=auto works on folder sources)")
    visible = _VISIBLE_DIRS.get(found.layout)
    return missing_maps_help(found.root / visible if visible else "<the visible images, named as the samples>",
                             found.root / cfg.semantic_dir, recursive=True)


def _auto_semantic(cfg: DataConfig, found: Found, reader, records: list[Record],
                   problems: list[str]) -> list[Record]:
    """`data.semantic_source: auto`: give records without a semantic map one made by the panoptic
    segmenter, cached in `<root>/semantic_auto/<name>.png` and reused on later runs."""
    if isinstance(reader, TableReader):
        if reader.has_semantic:
            return records
        raise DataError(f"{cfg.source}: data.semantic_source=auto makes maps for folder sources only; this table "
                        f"has no semantic column {cfg.semantic_column!r}: {maps_help(cfg, found)}")
    from vis2ir.io.inputs import AUTO_DIR, map_path
    from vis2ir.segment import ensure_maps

    cache = found.root / AUTO_DIR
    lacking = [r for r in records if r.semantic is None and r.triptych is None]
    if not lacking:
        return records
    refused = [r for r in lacking if r.name in found.map_problems]  # a map is there but was not taken: say why
    if refused:
        where = found.root / cfg.semantic_dir
        log.warning("data.semantic_source=auto: %d samples get a made map although %s has one for them, e.g. %s",
                    len(refused), where, found.no_map(refused[0], where))
    failed = ensure_maps([(r.name, Path(r.visible), cache) for r in lacking], cfg.segment_model,
                         setting="data.segment_model")
    problems += [f"{r.visible}: the segmenter failed ({failed[r.name]})" for r in lacking if r.name in failed]
    made = {r.name: str(map_path(cache, r.name)) for r in lacking if r.name not in failed}
    return [replace(r, semantic=made[r.name]) if r.name in made else r for r in records]


def _report(cfg: DataConfig, problems: list[str]) -> None:
    """Raise the first problem (`on_bad_sample: error`) or warn about each (`skip`)."""
    if not problems:
        return
    if cfg.on_bad_sample == "error":
        more = {1: "", 2: "; 1 more problem"}.get(len(problems), f"; {len(problems) - 1} more problems")
        raise DataError(f"{problems[0]}{more} (data.on_bad_sample=skip leaves bad samples out)")
    for text in problems[:20]:
        log.warning("skipping: %s", text)
    log.warning("%s: skipped %d bad samples or files", cfg.source, len(problems))
