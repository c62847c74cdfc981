"""Sample names from data (a table's name column, list files, file stems) become output file names:
a name that would leave the output folder is refused where the source is read, and every writer
checks its path stays inside its folder."""

import numpy as np
import pytest

from vis2ir.config import load_config
from vis2ir.data import build_dataset
from vis2ir.data.convert import convert_source
from vis2ir.data.errors import DataError
from vis2ir.data.synth import _png
from vis2ir.data.tables import write_parquet
from vis2ir.data.thermalscenes import render_scene
from vis2ir.errors import Vis2IRError

BAD_NAMES = ["../escaped", "/tmp/vis2ir-absolute-name", "a/../../escaped2", "", "a//b", "nul\x00name", "back\\slash"]


def table_with_names(path, names):
    """A parquet table of 32-px ThermalScenes scenes under the given names."""
    rows = []
    for k, name in enumerate(names):
        scene = render_scene(k, 5, 32)
        rows.append({"name": name, **{k: _png(getattr(scene, k)) for k in ("visible", "infrared", "semantic")}})
    write_parquet(path, rows)
    return path


def test_name_rules():
    from vis2ir.files import name_problem, safe_join

    assert name_problem("scene_000001") is None and name_problem("set00/V000/I01216") is None
    for bad in BAD_NAMES:
        assert name_problem(bad), bad
    assert safe_join("/out", "train/x", ".png").as_posix() == "/out/train/x.png"
    for bad in BAD_NAMES:
        with pytest.raises(Vis2IRError, match="sample name"):
            safe_join("/out", bad, ".png")


@pytest.mark.parametrize("fmt", ["folder", "parquet"])
def test_convert_refuses_names_that_leave_the_output_folder(tmp_path, fmt):
    names = ["good_0", "../escaped", "/tmp/vis2ir-absolute-name", "good_1", "a/../../escaped2"]
    source = table_with_names(tmp_path / "src" / "train.parquet", names)
    out = tmp_path / "deep" / "out"
    cfg = load_config(None, [f"data.source={source}"]).data
    with pytest.raises(DataError, match=r"train.parquet \[train\] row 1: sample name '\.\./escaped' has an empty, "
                                        r"'\.' or '\.\.' part .*\(3 problems"):
        convert_source(cfg, out, fmt)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["src/train.parquet"]


def test_reading_a_table_leaves_bad_names_out_or_stops(tmp_path):
    """What `vis2ir evaluate --checkpoint`, the ablation and training read: with `on_bad_sample: skip`
    the bad rows are left out (and named in a warning), else the first is the error."""
    names = [f"s{k}" for k in range(12)] + ["../escaped", "/abs/x"]
    source = table_with_names(tmp_path / "t" / "test.parquet", names)
    with pytest.raises(DataError, match=r"sample name '\.\./escaped'.*must stay inside the output folder"):
        build_dataset(load_config(None, [f"data.source={source}", "data.size=32"]).data, "test")
    ds = build_dataset(load_config(None, [f"data.source={source}", "data.size=32",
                                          "data.on_bad_sample=skip"]).data, "test")
    assert sorted(ds[i]["name"] for i in range(len(ds))) == sorted(names[:12])


def test_writers_check_their_folder(tmp_path):
    """The writers themselves refuse a bad name (whatever its source): segment maps, evaluation
    predictions."""
    from vis2ir.evaluate.run import predict
    from vis2ir.segment import Panoptic, map_path, write_panoptic

    with pytest.raises(Vis2IRError, match="inside the output folder"):
        map_path(tmp_path / "maps", "a/../../x")
    with pytest.raises(Vis2IRError, match="sample name '../x'"):
        write_panoptic(tmp_path / "maps", "../x", Panoptic(np.zeros((4, 4), np.int32), []))

    class Pipe:  # the pipeline's call interface; the check happens before anything is generated
        needs_semantic = False

        def __call__(self, visible, semantic, **kw):
            import torch
            from types import SimpleNamespace

            return SimpleNamespace(images=torch.zeros(len(visible), 3, 8, 8))

    import torch

    with pytest.raises(Vis2IRError, match="sample name '/abs/x'"):
        predict(Pipe(), [{"name": "/abs/x", "visible": torch.zeros(3, 8, 8)}], tmp_path / "pred")
    assert not (tmp_path / "maps").exists() and not (tmp_path / "pred").exists()
