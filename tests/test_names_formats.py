"""Names and formats (issue 26, item 10): file names that are not UTF-8, names with spaces in list files, and
photo formats the readers cannot decode are processed or named in one line, never a traceback or silence."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vis2ir.cli import main
from vis2ir.config import DataConfig
from vis2ir.data import build_dataset, inspect_source, write_thermalscenes
from vis2ir.data.convert import convert_source
from vis2ir.data.dataset import open_source
from vis2ir.errors import Vis2IRError
from vis2ir.evaluate.run import evaluate_folders
from vis2ir.figures import image_grid
from vis2ir.io.inputs import list_inputs, printable

from tests.data.datafiles import write_pair

LATIN1 = "caf\udce9"  # b"caf\xe9" (a Latin-1 'café') as os.listdir gives it: not UTF-8


def rename_bytes(folder: Path, old: str, new: str) -> None:
    """Rename every `<kind>/<old>.png` of a data folder to the name `new` (its bytes on disk)."""
    for kind in ("visible", "infrared", "semantic"):
        os.rename(folder / kind / f"{old}.png", folder / kind / f"{new}.png")


@pytest.fixture
def latin1_folder(tmp_path):
    root = tmp_path / "data"
    write_thermalscenes(root, 8, size=32, seed=1)
    try:
        rename_bytes(root, "scene_000001", LATIN1)
    except (UnicodeEncodeError, OSError):
        pytest.skip("this file system takes UTF-8 names only")
    return root


def test_printable_escapes_only_the_odd_bytes():
    assert printable(LATIN1) == "caf\\xe9" and printable("café x") == "café x"


def test_training_data_inspect_and_convert_take_names_that_are_not_utf8(latin1_folder, tmp_path):
    cfg = DataConfig(source=str(latin1_folder), size=32, val_fraction=0.0, test_fraction=0.0)
    data = build_dataset(cfg, "train")  # the split hash of such a name raised UnicodeEncodeError
    assert LATIN1 in [r.name for r in data.records]
    assert data[[r.name for r in data.records].index(LATIN1)]["visible"].shape == (3, 32, 32)
    report = inspect_source(cfg, out=tmp_path / "sheet.png")  # the contact sheet names it, escaped
    assert report["counts"]["train"] == 8 and not report["problems"] and (tmp_path / "sheet.png").is_file()
    assert main(["data", "inspect", str(latin1_folder), "--out", str(tmp_path / "sheet2.png")]) == 0
    convert_source(cfg, tmp_path / "copy", "folder")  # list files keep the name's bytes, and read back
    copy = build_dataset(DataConfig(source=str(tmp_path / "copy"), size=32, val_fraction=0.0), "train")
    assert LATIN1 in [r.name for r in copy.records] and len(copy) == 8
    convert_source(cfg, tmp_path / "table", "parquet")


def test_a_name_that_is_not_utf8_survives_parquet_and_back(latin1_folder, tmp_path):
    """`data convert` to parquet then back to folders: the table keeps the name's bytes (before: the name was
    stored escaped, and converting the table back refused it for its backslash)."""
    def names(source: Path) -> list[str]:
        found, _ = open_source(DataConfig(source=str(source), size=32))
        return sorted(r.name for r in found.records)

    assert main(["data", "convert", str(latin1_folder), "--out", str(tmp_path / "pq"), "--format", "parquet"]) == 0
    assert LATIN1 in names(tmp_path / "pq") and names(tmp_path / "pq") == names(latin1_folder)
    assert main(["data", "convert", str(tmp_path / "pq"), "--out", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "visible" / f"{LATIN1}.png").is_file()
    assert names(tmp_path / "back") == names(latin1_folder)


def test_evaluate_and_figures_take_names_that_are_not_utf8(latin1_folder, tmp_path):
    evaluate_folders(latin1_folder / "infrared", latin1_folder / "infrared", latin1_folder / "semantic",
                     out=tmp_path / "eval")  # the reports could not write the name
    assert "caf\\xe9" in (tmp_path / "eval" / "per_image.csv").read_text(encoding="utf-8")
    tile = np.zeros((8, 8, 3), np.uint8)
    image_grid([[tile]], title=f"compare {LATIN1}", column_labels=[LATIN1], row_labels=[LATIN1]).savefig(
        tmp_path / "grid.png")  # generate --compare's figures: matplotlib cannot draw surrogates


def paired(root: Path, names: list[str]) -> Path:
    for k, name in enumerate(names):
        write_pair(root / "visible" / f"{name}.png", root / "infrared" / f"{name}.png", k, size=32)
    return root


def test_list_files_take_whole_lines_as_names_with_spaces(tmp_path, caplog):
    names = [f"photo {k}" if k % 2 else f"photo_{k}" for k in range(12)]
    root = paired(tmp_path / "d", names)
    (root / "train.txt").write_text("".join(f"{n}.png\n" for n in names[:9]) + "\n  \n")
    (root / "test.txt").write_text("".join(f"{n}\r\n" for n in names[9:]) + "not here\n")
    cfg = DataConfig(source=str(root), size=32, val_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="vis2ir.data"):
        train = build_dataset(cfg, "train")
    assert sorted(r.name for r in train.records) == sorted(names[:9])  # 6 of 12 were dropped in silence
    assert sorted(r.name for r in build_dataset(cfg, "test").records) == sorted(names[9:])
    assert "1 names in the list files of" in caplog.text and "'not here'" in caplog.text


def test_a_heic_photo_in_a_generate_folder_is_named(tmp_path, caplog):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "phone.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")  # a HEIC Pillow cannot open here
    with caplog.at_level(logging.WARNING, logger="vis2ir"):
        items = list_inputs(tmp_path)
    assert [it.name for it in items] == ["a"]
    assert "1 image files of formats vis2ir does not read (.heic)" in caplog.text and "phone.HEIC" in caplog.text


def test_a_heic_prediction_or_truth_is_named_by_evaluate(tmp_path, caplog):
    for folder in ("pred", "truth"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.full((16, 16), 100, np.uint8)).save(tmp_path / folder / "a.png")
    (tmp_path / "truth" / "b.png").write_bytes((tmp_path / "truth" / "a.png").read_bytes())
    (tmp_path / "pred" / "b.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    with pytest.raises(Vis2IRError, match=r"--pred .*e\.g\. b\.\* \(its image .*b\.heic is of a format vis2ir does "
                                          r"not read; convert it to PNG"):
        evaluate_folders(tmp_path / "pred", tmp_path / "truth", out=tmp_path / "eval")
    (tmp_path / "truth" / "c.heif").write_bytes(b"\x00\x00\x00\x18ftypheif")
    (tmp_path / "pred" / "b.heic").unlink()
    (tmp_path / "truth" / "b.png").unlink()
    with caplog.at_level(logging.WARNING, logger="vis2ir"):
        evaluate_folders(tmp_path / "pred", tmp_path / "truth", out=tmp_path / "eval")
    assert "--truth" in caplog.text and "c.heif" in caplog.text


def test_a_heic_given_as_a_file_gets_the_same_format_line_as_in_a_folder(tmp_path):
    """`generate --input phone.HEIC`, a map or an upload of one: every reader (`io.images.open_image`) names the
    format and the way out, as a folder's listing does; before: "cannot read image (UnidentifiedImageError: …)"."""
    from vis2ir.io.images import ImageError, read_image

    heic = tmp_path / "phone.HEIC"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic")
    with pytest.raises(ImageError, match=r"phone\.HEIC: a \.heic file, a format vis2ir does not read; convert it to "
                                         r"PNG \(read: \.jpg") as err:
        read_image(heic)
    assert "Unidentified" not in str(err.value)
    (tmp_path / "bad.png").write_bytes(b"not a png")  # a damaged file of a format vis2ir reads: still "cannot read"
    with pytest.raises(ImageError, match=r"bad\.png: cannot read image"):
        read_image(tmp_path / "bad.png")
