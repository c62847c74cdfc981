"""`vis2ir data convert`: any source (folder layout or table) to folders or to parquet, same samples.

Folders: `<out>/{visible,infrared,semantic}/<name>.png` and list files `train.txt`, `val.txt`,
`test.txt` that keep every sample's split (the `paired` layout). Parquet: `<out>/<split>.parquet`
with columns `name`, `visible`, `infrared` and, when the source has semantic maps, `panoptic_img`
(the specification's table). Panels are stored losslessly as PNG at their stored size and bit depth.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from tqdm.auto import tqdm

from vis2ir.config import DataConfig
from vis2ir.data.dataset import _use_semantic, maps_help, open_source
from vis2ir.data.errors import DataError
from vis2ir.data.images import Panel, close_panels, load_upright
from vis2ir.data.splits import SPLITS
from vis2ir.data.tables import write_parquet
from vis2ir.files import safe_join, write_bytes, write_text
from vis2ir.io.inputs import printable
from vis2ir.io.images import full_range_info, is_full_range

log = logging.getLogger(__name__)
FORMATS = ("folder", "parquet")


def convert_source(cfg: DataConfig, out: str | Path, fmt: str = "folder") -> Path:
    """Write every sample of `cfg.source` to `out` as `fmt`; returns what `data.source` should name."""
    if fmt not in FORMATS:
        raise DataError(f"convert: unknown format {fmt!r} (expected folder or parquet)")
    if cfg.source == "thermalscenes":
        raise DataError("convert: for ThermalScenes use `vis2ir data synth --format folder|parquet`")
    found, reader = open_source(cfg)
    if found.problems:
        n = len(found.problems)
        raise DataError(f"{found.problems[0]} ({n} problem{'s' if n != 1 else ''}; fix them before converting)")
    semantic, _ = _use_semantic(cfg, found, reader, found.records, None)
    lacking = [r for r in found.records if r.semantic is None and r.triptych is None]
    if not semantic and len(lacking) < len(found.records):  # some maps, not all: converting would drop them all
        where = found.root / cfg.semantic_dir
        raise DataError(f"{found.no_map(lacking[0], where)} ({len(lacking)} of {len(found.records)} samples lack "
                        f"one, the others have one, and a converted set carries maps for all samples or none): "
                        f"{maps_help(cfg, found)}; or move {where} away to convert without maps")
    kinds = ("visible", "infrared", "semantic") if semantic else ("visible", "infrared")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        # a name from a file name that is not UTF-8 is shown escaped in `name` and kept exactly in `name_bytes`
        raw = any(printable(r.name) != r.name for r in found.records)
        for split in SPLITS:
            records = [r for r in found.records if r.split == split]
            if records:
                bar = tqdm(records, desc=f"{split} -> {out}", unit="sample")
                write_parquet(out / f"{split}.parquet",
                              ({"name": r.name, **_pngs(reader.open(r, semantic))} for r in bar), kinds, raw)
    else:
        lists: dict[str, list[str]] = {s: [] for s in SPLITS}
        for r in tqdm(found.records, desc=f"convert -> {out}", unit="sample"):
            for kind, data in _pngs(reader.open(r, semantic)).items():
                write_bytes(safe_join(out / kind, r.name, ".png"), data)
            lists[r.split].append(r.name)
        for split, names in lists.items():
            # names from file names that are not UTF-8 keep their bytes, as the files written above do
            write_text(out / f"{split}.txt", "".join(f"{n}\n" for n in names))
    log.info("converted %d samples of %s (%s) to %s in %s", len(found.records), cfg.source, found.layout, fmt, out)
    return out


def _pngs(panels: dict[str, Panel]) -> dict[str, bytes]:
    """Each panel's pixels (its view of the stored image, upright, at full size) as PNG bytes; a 16-bit infrared
    vis2ir wrote keeps its full-range mark (`io.images.is_full_range`), so it is still read as value/65535."""
    try:
        out = {}
        for kind, panel in panels.items():
            upright = load_upright(panel)  # EXIF orientation applied: the PNG carries no tag
            (w, h), (x0, y0, x1, y1) = upright.size, panel.view
            marked = is_full_range(upright)
            image = upright.crop((round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)))
            if image.mode not in ("L", "RGB", "I;16", "I", "RGBA", "LA"):
                image = image.convert("RGB")
            buf = io.BytesIO()
            image.save(buf, format="PNG", compress_level=3, pnginfo=full_range_info() if marked else None)
            out[kind] = buf.getvalue()
        return out
    finally:
        close_panels(panels)
