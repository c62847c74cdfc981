"""Table sources: parquet files, a `datasets` folder (`save_to_disk`) or a Hub data set.

Each row holds a visible and an infrared image column (`data.visible_column`, `data.infrared_column`)
or one triptych column (`data.triptych_column`), and optionally a semantic column
(`data.semantic_column`, default `panoptic_img`) and a name column (`data.name_column`). Image cells
may be `datasets` Image structs (`{bytes, path}`), raw bytes or file paths. Parquet files are read
through `datasets` (converted once to a memory-mapped Arrow cache, so random access is cheap); a
file's split comes from its name (`train-00000-of-00001.parquet`, `val.parquet`) or its folder, a
`datasets` DatasetDict's from its keys, else from a hash of the sample name.
"""

from __future__ import annotations

import glob
import io
import json
import re
from pathlib import Path

from vis2ir.config import DataConfig
from vis2ir.data.errors import DataError, describe
from vis2ir.data.folders import Found, Record
from vis2ir.data.images import PANEL_KINDS, Panel, open_image, triptych_panels
from vis2ir.data.splits import assign_splits, split_alias
from vis2ir.files import atomic_write
from vis2ir.files import is_hidden, list_files
from vis2ir.io.inputs import printable

NAME_BYTES = "name_bytes"  # a name's exact bytes, where it is not UTF-8 (the name column holds it escaped)


def is_table(source: str) -> bool:
    """Whether `source` names a table: parquet files, a `datasets` folder, or a Hub id."""
    path = Path(source).expanduser()
    if glob.has_magic(source) or source.endswith(".parquet"):
        return True
    if path.is_dir():
        return (any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))
                or bool(list_files(path, "*.parquet", recursive=True)))
    return not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None


def find_table(cfg: DataConfig) -> tuple[Found, TableReader]:
    """Load the table(s) of `cfg.source` and describe every row as a `Record`."""
    tables = _load(cfg.source)
    columns = _columns(cfg, tables)
    names, official, where = [], [], []
    for key, ds in tables.items():
        if cfg.name_column in ds.column_names:
            keyed = [str(n) for n in ds[cfg.name_column]]
            if NAME_BYTES in ds.column_names:  # names vis2ir wrote from file names that are not UTF-8
                keyed = [n if b is None else bytes(b).decode("utf-8", "surrogateescape")
                         for n, b in zip(keyed, ds[NAME_BYTES])]
        else:
            keyed = [f"{key}/{i:06d}" for i in range(len(ds))]
        names += keyed
        official += [split_alias(key)] * len(ds)
        where += [(key, i) for i in range(len(ds))]
    splits = assign_splits(names, official, cfg.val_fraction, cfg.test_fraction)
    records = [Record(name, split, table=key, row=i) for name, split, (key, i) in zip(names, splits, where)]
    reader = TableReader(cfg.source, {k: ds.select_columns(list(columns.values())) for k, ds in tables.items()},
                         columns)
    return Found("table", Path(cfg.source), records), reader


class TableReader:
    """Opens the panels of a table row (image cells decoded lazily, like files)."""

    def __init__(self, source: str, tables: dict, columns: dict[str, str]):
        self.source, self.tables, self.columns = source, tables, columns

    @property
    def has_semantic(self) -> bool:
        return "semantic" in self.columns or "triptych" in self.columns

    def open(self, record: Record, semantic: bool | None) -> dict[str, Panel]:
        """The row's panels; `semantic`: with the semantic map (None: when the table has them)."""
        semantic = self.has_semantic if semantic is None else semantic
        row = self.tables[record.table][record.row]
        label = f"{self.source} [{record.table}] row {record.row} ({record.name})"
        if "triptych" in self.columns:
            panels = triptych_panels(self._image(row, "triptych", label), f"{label} column {self.columns['triptych']}")
            return panels if semantic else {k: panels[k] for k in ("visible", "infrared")}
        kinds = ("visible", "infrared", "semantic") if semantic else ("visible", "infrared")
        return {kind: Panel(self._image(row, kind, label), f"{label} column {self.columns[kind]}") for kind in kinds}

    def _image(self, row: dict, kind: str, label: str):
        column = self.columns[kind]
        cell = row[column]
        where = f"{label} column {column}"
        if isinstance(cell, dict):
            cell = cell.get("bytes") or cell.get("path")
        if isinstance(cell, (bytes, bytearray)):
            return open_image(io.BytesIO(cell), where)
        if isinstance(cell, str) and cell:
            return open_image(cell, where)
        raise DataError(f"{where}: no image in this cell ({type(cell).__name__})")


def _load(source: str) -> dict:
    """{split or group name: datasets.Dataset} for parquet files, a saved folder or a Hub id."""
    import datasets  # slow to import; only table sources need it

    path = Path(source).expanduser()
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(path))
        elif glob.has_magic(source) or path.suffix == ".parquet" or path.is_dir():
            files = sorted(f for f in glob.glob(str(path), recursive=True) if not is_hidden(Path(f))) if (
                glob.has_magic(source)) else ([str(p) for p in list_files(path, "*.parquet", recursive=True)]
                                              if path.is_dir() else [str(path)])
            if not files:
                raise DataError(f"{source}: no parquet files found")
            groups: dict[str, list[str]] = {}
            for f in files:
                groups.setdefault(_file_split(Path(f)), []).append(f)
            loaded = datasets.load_dataset("parquet", data_files=groups)
        else:
            loaded = datasets.load_dataset(source)
    except DataError:
        raise
    except Exception as err:  # missing files, bad parquet, no network for a Hub id, ...
        raise DataError(f"{source}: cannot load the table ({describe(err)})") from None
    tables = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"data": loaded}
    return {key: _undecoded(ds, datasets) for key, ds in tables.items()}


def _undecoded(ds, datasets):
    """The same table with image columns left as bytes (decoded later, with JPEG draft)."""
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return ds


def _file_split(path: Path) -> str:
    """A parquet file's split from its name (`train-00000-of-00001`, `val`) or folder, else 'data'."""
    for text in (re.split(r"[-_.]", path.stem)[0], path.parent.name):
        if split_alias(text):
            return split_alias(text)
    return "data"


def _columns(cfg: DataConfig, tables: dict) -> dict[str, str]:
    """Which column holds each panel ({'visible', 'infrared'} or {'triptych'}, plus 'semantic')."""
    first = next(iter(tables.values()))
    have = set(first.column_names)
    if {cfg.visible_column, cfg.infrared_column} <= have:
        columns = {"visible": cfg.visible_column, "infrared": cfg.infrared_column}
    elif cfg.triptych_column in have:
        columns = {"triptych": cfg.triptych_column}
    else:
        raise DataError(f"{cfg.source}: no image columns {cfg.visible_column!r} + {cfg.infrared_column!r} "
                        f"nor {cfg.triptych_column!r} (columns: {', '.join(sorted(have))}); set "
                        "data.visible_column and data.infrared_column, or data.triptych_column")
    if cfg.semantic_column in have and "triptych" not in columns:
        columns["semantic"] = cfg.semantic_column
    return columns


def write_parquet(path: Path, rows, kinds: tuple[str, ...] = PANEL_KINDS, raw_names: bool = False) -> None:
    """Stream rows (`name`, and PNG bytes per panel kind in `kinds`) into a parquet file, atomically,
    with the default column names, whose image columns `datasets` reads as Image features.

    A name that is not UTF-8 (from a file name, surrogate-escaped) is written escaped (`io.inputs.printable`)
    in the name column; with `raw_names` its exact bytes also go to a `name_bytes` column (null for the
    other names), which `find_table` reads back, so a converted set keeps such names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = DataConfig()
    names = {"visible": cfg.visible_column, "infrared": cfg.infrared_column, "semantic": cfg.semantic_column}
    columns = {kind: names[kind] for kind in kinds}
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {cfg.name_column: {"dtype": "string", "_type": "Value"}}
    fields = [(cfg.name_column, pa.string())]
    if raw_names:
        features[NAME_BYTES] = {"dtype": "binary", "_type": "Value"}
        fields.append((NAME_BYTES, pa.binary()))
    features.update({c: {"_type": "Image"} for c in columns.values()})
    schema = pa.schema(fields + [(c, image) for c in columns.values()],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})

    def write(tmp: Path) -> None:
        batch: list[dict] = []
        with pq.ParquetWriter(tmp, schema) as writer:
            for row in rows:
                name = row["name"]
                out = {cfg.name_column: printable(name)}
                if raw_names:
                    out[NAME_BYTES] = None if printable(name) == name else name.encode("utf-8", "surrogateescape")
                out.update({c: {"bytes": row[kind], "path": None} for kind, c in columns.items()})
                batch.append(out)
                if len(batch) == 64:
                    writer.write_table(pa.Table.from_pylist(batch, schema))
                    batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema))

    atomic_write(path, write)
