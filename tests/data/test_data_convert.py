"""`vis2ir data convert`: folders -> parquet -> folders keeps every sample, split and pixel."""

import pytest
import torch

from vis2ir.cli import main
from vis2ir.config import load_config
from vis2ir.data import build_dataset, write_thermalscenes
from vis2ir.data.convert import convert_source
from vis2ir.data.errors import DataError


def samples(source, semantic=True):
    cfg = load_config(None, [f"data.source={source}", "data.size=32", "data.hflip=false"]).data
    out = {}
    for split in ("train", "val", "test"):
        try:
            ds = build_dataset(cfg, split, require_semantic=semantic)
        except DataError as err:
            assert "no samples in split" in str(err)
            continue
        out.update({ds[i]["name"]: (split, ds[i]) for i in range(len(ds))})
    return out


def test_round_trip(tmp_path, capsys):
    src = write_thermalscenes(tmp_path / "synth", count=12, size=32)
    assert main(["data", "convert", str(src), "--out", str(tmp_path / "pq"), "--format", "parquet"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "pq")
    assert (tmp_path / "pq" / "train.parquet").is_file()
    back = convert_source(load_config(None, [f"data.source={tmp_path / 'pq'}"]).data, tmp_path / "back")
    assert (back / "semantic" / "scene_000000.png").is_file() and (back / "train.txt").is_file()
    original, table, folders = samples(src), samples(tmp_path / "pq"), samples(back)
    assert original.keys() == table.keys() == folders.keys() and len(original) == 12
    for name, (split, sample) in original.items():
        for other in (table, folders):
            assert other[name][0] == split
            for kind in ("visible", "infrared", "semantic"):
                assert torch.equal(other[name][1][kind], sample[kind]), (name, kind)


def test_without_semantic_maps(tmp_path):
    src = write_thermalscenes(tmp_path / "synth", count=4, size=32)
    for f in (src / "semantic").iterdir():
        f.unlink()
    out = convert_source(load_config(None, [f"data.source={src}"]).data, tmp_path / "pq", "parquet")
    import pyarrow.parquet as pq

    columns = {c for f in out.glob("*.parquet") for c in pq.read_schema(f).names}
    assert columns == {"name", "visible", "infrared"}
    with pytest.raises(DataError, match="vis2ir data synth"):
        convert_source(load_config(None, []).data, tmp_path / "x")


@pytest.mark.parametrize("fmt", ["folder", "parquet"])
def test_some_maps_missing_or_refused_is_an_error_not_every_map_dropped(tmp_path, fmt):
    """A source where some samples have a semantic map and others not (none there, or two suffixes for one name) is
    refused in one line naming the first such sample and why; before, the converted set silently had no maps at
    all. With every map in place the maps are converted; with none, the set converts without them."""
    src = write_thermalscenes(tmp_path / "synth", count=4, size=32)
    maps = sorted((src / "semantic").iterdir())
    cfg = load_config(None, [f"data.source={src}"]).data
    (maps[0].with_suffix(".jpg")).write_bytes(maps[0].read_bytes())  # one name, two suffixes
    with pytest.raises(DataError) as refused:
        convert_source(cfg, tmp_path / "a", fmt)
    assert f"several semantic maps named {maps[0].stem}.*" in str(refused.value)
    assert "1 of 4 samples lack one" in str(refused.value) and "\n" not in str(refused.value)
    maps[0].with_suffix(".jpg").unlink()
    maps[1].unlink()  # one map missing
    with pytest.raises(DataError, match=f"{maps[1].stem}.png: no semantic map in {src / 'semantic'}"):
        convert_source(cfg, tmp_path / "b", fmt)
    assert not (tmp_path / "b" / "semantic").exists() and not list((tmp_path / "b").glob("*.parquet"))
