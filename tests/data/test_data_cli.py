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


def test_inspect_reports_pairing_problems(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert main(["data", "synth", "--out", str(tmp_path), "--count", "4", "--size", "32"]) == 0
    (tmp_path / "infrared/scene_000001.png").unlink()
    assert main(["data", "inspect", str(tmp_path)]) == 0
    assert "problems: 1" in caplog.text and "scene_000001.png: missing partner" in caplog.text


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
