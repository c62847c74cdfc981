"""`vis2ir data synth` and `vis2ir data inspect` from the command line."""

import logging

import numpy as np
from PIL import Image

from vis2ir.cli import main


def test_synth_then_inspect(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "scenes"
    assert main(["data", "synth", "--out", str(out), "--count", "12", "--size", "48", "--seed", "2"]) == 0
    assert len(list((out / "semantic").glob("*.png"))) == 12
    sheet = tmp_path / "sheet.png"
    caplog.clear()
    assert main(["data", "inspect", str(out), "data.val_fraction=0.25", "--out", str(sheet), "--count", "3"]) == 0
    assert "panel sizes (visible): 48x48 x12" in caplog.text and "problems: 0" in caplog.text
    image = np.asarray(Image.open(sheet))
    assert image.shape[0] > 3 * 160 and image.shape[1] > 3 * 160  # three rows of labelled 160-pixel panels
    assert image.std() > 10  # real pictures, not blanks


def test_inspect_reports_pairing_problems(tmp_path, caplog, capsys, monkeypatch):
    """Problems found: the report and the contact sheet are written, then the exit status is 2 (it was 0)."""
    caplog.set_level(logging.INFO)
    data = tmp_path / "pairs"
    assert main(["data", "synth", "--out", str(data), "--count", "4", "--size", "32"]) == 0
    (data / "infrared/scene_000001.png").unlink()
    monkeypatch.chdir(tmp_path)
    assert main(["data", "inspect", str(data)]) == 2
    assert "problems: 1" in caplog.text and "scene_000001.png: missing partner" in caplog.text
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vis2ir: error:")]
    assert len(errors) == 1 and "1 problem found" in errors[0] and "outputs/inspect/pairs.png" in errors[0]
    assert "contact sheet: outputs/inspect/pairs.png" in caplog.text
    assert Image.open(tmp_path / "outputs/inspect/pairs.png").size[0] >= 3 * 160  # the default place: 3 labelled columns


def test_inspect_reports_missing_semantic_maps_when_the_mode_needs_them(tmp_path, caplog, capsys, monkeypatch):
    caplog.set_level(logging.INFO)
    assert main(["data", "synth", "--out", str(tmp_path), "--count", "4", "--size", "32"]) == 0
    for path in (tmp_path / "semantic").iterdir():
        path.unlink()
    monkeypatch.chdir(tmp_path)
    assert main(["data", "inspect", str(tmp_path), "--out", "s.png", "model.semantic.mode=none"]) == 0
    assert main(["data", "inspect", str(tmp_path), "--out", "s.png"]) == 2  # no config: any semantic mode needs maps
    problem = caplog.text.split("problems: 1\n")[1].splitlines()[0]
    assert "no semantic map in" in problem and "a semantic mode (any model.semantic.mode but none) needs them" in problem
    for way_out in ("vis2ir segment --input", "data.semantic_source=auto", "data.semantic_source=boxes",
                    "model.semantic.mode=none"):
        assert way_out in problem
    caplog.clear()
    assert main(["data", "inspect", str(tmp_path), "--out", "s.png", "model.semantic.mode=channel_concat"]) == 2
    problem = caplog.text.split("problems: 1\n")[1].splitlines()[0]
    assert "model.semantic.mode=channel_concat needs them" in problem  # the mode the user chose is named
    caplog.clear()
    assert main(["data", "inspect", str(tmp_path), "--out", "s.png", "data.semantic_source=auto"]) == 0
    assert "data.semantic_source=auto makes the missing ones on first use" in caplog.text


def test_synth_parquet_and_inspect_thermalscenes(tmp_path, caplog):
    assert main(["data", "synth", "--out", str(tmp_path), "--count", "3", "--size", "32", "--format", "parquet"]) == 0
    assert (tmp_path / "thermalscenes.parquet").is_file()
    assert main(["data", "inspect", "thermalscenes", "data.synth_count=50", "--out", str(tmp_path / "s.png"),
                 "--count", "2"]) == 0
    assert (tmp_path / "s.png").is_file()


def test_data_errors_are_one_line_with_status_2(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vis2ir: error: ") and err.count("\n") == 1 and "missing: no such folder" in err
