"""Bad data: each case gets a one-line error naming the file, or with `on_bad_sample: skip` a warning
and a count; an epoch never crashes half-way."""

import logging

import numpy as np
import pytest
from datafiles import save, scene, write_pair

from vis2ir.config import DataConfig
from vis2ir.data import DataError, build_dataset, make_loader

N = 6  # good samples in every test folder


def good_pairs(root, n=N, semantic=False, suffix=".png"):
    for k in range(n):
        write_pair(root / f"visible/g{k}{suffix}", root / f"infrared/g{k}{suffix}", k,
                   root / f"semantic/g{k}.png" if semantic else None)


def config(root, **kw):
    return DataConfig(source=str(root), size=32, val_fraction=0.0, test_fraction=0.0, **kw)


def assert_error_then_skip(root, pattern, caplog, skipped=1, **kw):
    """Default: a DataError matching `pattern`; with skip: warnings, a count, the good samples only."""
    with pytest.raises(DataError, match=pattern) as err:
        build_dataset(config(root), "train", **kw)
    assert "\n" not in str(err.value)
    with caplog.at_level(logging.WARNING, logger="vis2ir.data"):
        ds = build_dataset(config(root, on_bad_sample="skip"), "train", **kw)
    assert len(ds) == N
    assert f"skipped {skipped} bad samples or files" in caplog.text
    assert sorted(ds[i]["name"] for i in range(len(ds))) == [f"g{k}" for k in range(N)]


def test_missing_partner(tmp_path, caplog):
    good_pairs(tmp_path)
    save(tmp_path / "visible/lonely.png", scene(0).visible)
    save(tmp_path / "infrared/orphan.png", scene(1).infrared)
    assert_error_then_skip(tmp_path, r"visible/lonely\.png: missing partner: no infrared image for it in "
                                     r".*infrared; 1 more problem \(data\.on_bad_sample=skip", caplog, skipped=2)


def test_size_mismatch(tmp_path, caplog):
    good_pairs(tmp_path)
    save(tmp_path / "visible/odd.png", scene(0).visible)
    save(tmp_path / "infrared/odd.png", scene(0, size=48).infrared)
    assert_error_then_skip(tmp_path, r"infrared/odd\.png: size mismatch: infrared is 48x48 but visible "
                                     r".*visible/odd\.png is 64x64", caplog)


def test_unreadable_file(tmp_path, caplog):
    good_pairs(tmp_path)
    (tmp_path / "visible/junk.png").write_bytes(b"this is not an image")
    save(tmp_path / "infrared/junk.png", scene(0).infrared)
    assert_error_then_skip(tmp_path, r"visible/junk\.png: cannot read image \(UnidentifiedImageError", caplog)


def test_triptych_width_not_divisible_by_three(tmp_path, caplog):
    for k in range(N):
        s = scene(k)
        save(tmp_path / f"g{k}.png", np.concatenate([s.visible, np.stack([s.infrared] * 3, -1), s.semantic], 1))
    save(tmp_path / "wide.png", np.zeros((64, 100, 3), np.uint8))
    assert_error_then_skip(tmp_path, r"wide\.png: triptych width 100 is not divisible by 3", caplog)


def test_missing_semantic_maps(tmp_path, caplog):
    good_pairs(tmp_path, semantic=True)
    write_pair(tmp_path / "visible/nomap.png", tmp_path / "infrared/nomap.png", 0)
    assert "semantic" not in build_dataset(config(tmp_path, on_bad_sample="skip"), "train")[0]  # not all have one
    assert_error_then_skip(tmp_path, r"visible/nomap\.png: no semantic map in .*semantic", caplog,
                           require_semantic=True)


def test_no_semantic_maps_at_all_when_the_mode_needs_them(tmp_path):
    good_pairs(tmp_path)
    with pytest.raises(DataError, match=r"semantic: no semantic maps for this data .*the semantic mode needs them"):
        build_dataset(config(tmp_path, on_bad_sample="skip"), "train", require_semantic=True)
    assert "semantic" not in build_dataset(config(tmp_path), "train")[0]


def test_empty_folders(tmp_path):
    with pytest.raises(DataError, match=r"no images and no known layout"):
        build_dataset(config(tmp_path), "train")
    (tmp_path / "visible").mkdir()
    (tmp_path / "infrared").mkdir()
    with pytest.raises(DataError, match=rf"{tmp_path}: no images found for layout 'paired'"):
        build_dataset(config(tmp_path), "train")
    with pytest.raises(DataError, match=r"nowhere: no such folder"):
        build_dataset(config(tmp_path / "nowhere"), "train")


def _truncated_folder(root):
    good_pairs(root, suffix=".jpg")
    write_pair(root / "visible/cut.jpg", root / "infrared/cut.jpg", 0)
    data = (root / "visible/cut.jpg").read_bytes()
    (root / "visible/cut.jpg").write_bytes(data[: len(data) // 2])  # the header still reads


def test_truncated_file_in_a_dataloader_is_one_clear_error(tmp_path):
    _truncated_folder(tmp_path)
    ds = build_dataset(config(tmp_path), "train")  # headers are fine: found only when decoding
    assert len(ds) == N + 1
    with pytest.raises(DataError) as err:
        for _ in make_loader(ds, batch_size=2, num_workers=1):
            pass
    assert str(err.value).startswith(f"{tmp_path / 'visible/cut.jpg'}: cannot decode image (OSError: image file "
                                     "is truncated")
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_truncated_file_with_skip_completes_the_epoch(tmp_path, caplog):
    _truncated_folder(tmp_path)
    ds = build_dataset(config(tmp_path, on_bad_sample="skip"), "train")
    with caplog.at_level(logging.WARNING, logger="vis2ir.data"):
        for _ in range(2):  # two epochs, two workers
            batches = list(make_loader(ds, batch_size=3, shuffle=True, num_workers=2))
            assert sum(len(b["name"]) for b in batches) == N + 1  # a good sample stood in for the bad one
            skipped = [s for b in batches for s in b.get("skipped", [])]
            assert len(skipped) == 1 and "cut.jpg: cannot decode image" in skipped[0]
    assert caplog.text.count("this epoch skipped 1 bad samples") == 2


def test_bad_table_cell(tmp_path, monkeypatch, caplog):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    good_pairs(tmp_path, n=3)
    rows = [{"name": f"r{k}", "visible": (tmp_path / f"visible/g{k}.png").read_bytes() if k else b"\x89PNG broken",
             "infrared": (tmp_path / f"infrared/g{k}.png").read_bytes()} for k in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    ds = build_dataset(config(tmp_path / "t.parquet"), "train")
    with pytest.raises(DataError, match=r"t\.parquet \[data\] row 0 \(r0\) column visible: cannot read image"):
        ds[0]
    ds = build_dataset(config(tmp_path / "t.parquet", on_bad_sample="skip"), "train")
    assert ds[0]["name"] == "r1" and ds[0]["skipped"][0].startswith(f"{tmp_path / 't.parquet'} [data] row 0")


def test_a_name_in_two_split_lists_is_a_problem_not_a_silent_leak(tmp_path, caplog, capsys):
    """A sample listed in train.txt and test.txt stayed in train without a word (a train/test leak) and
    `data inspect` reported 0 problems: it is now refused in one line naming it and both list files, or with
    `on_bad_sample: skip` left out of both splits, and `data inspect` exits 2."""
    from vis2ir.cli import main

    good_pairs(tmp_path, semantic=True)
    write_pair(tmp_path / "visible/both.png", tmp_path / "infrared/both.png", 9, tmp_path / "semantic/both.png")
    (tmp_path / "train.txt").write_text("".join(f"g{k}\n" for k in range(N)) + "both\n")
    (tmp_path / "test.txt").write_text("both\n")
    assert_error_then_skip(tmp_path, r"'both' is listed in both .*train\.txt and .*test\.txt: .*remove it from one "
                                     r"of these list files \(data.on_bad_sample=skip", caplog)
    with pytest.raises(DataError, match="no samples in split 'test'"):
        build_dataset(config(tmp_path, on_bad_sample="skip"), "test")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["data", "inspect", str(tmp_path), "--out", str(tmp_path / "sheet.png")]) == 2
    assert "'both' is listed in both" in caplog.text and ": 1 problem found (" in capsys.readouterr().err
