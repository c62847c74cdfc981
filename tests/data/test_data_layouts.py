"""Every layout of docs/design.md §8 (and the specification's tables) is read from small generated files."""

import logging

import numpy as np
import pytest
import torch
from datafiles import assert_sample, expected, save, scene, write_pair

from vis2ir.cli import main
from vis2ir.config import DataConfig
from vis2ir.data import SPLITS, DataError, build_dataset, collate, open_source
from vis2ir.data.folders import detect_layout


def splits_of(cfg: DataConfig, **kw) -> dict[str, dict[str, dict]]:
    """{split: {name: sample}} for every non-empty split."""
    found, _ = open_source(cfg)
    out = {}
    for split in SPLITS:
        if any(r.split == split for r in found.records):
            ds = build_dataset(cfg, split, **kw)
            out[split] = {ds[i]["name"]: ds[i] for i in range(len(ds))}
    return out


def test_paired_layout_with_semantic_maps(tmp_path):
    for k in range(12):
        write_pair(tmp_path / f"visible/s{k:02d}.png", tmp_path / f"infrared/s{k:02d}.png", k,
                   tmp_path / f"semantic/s{k:02d}.png")
    cfg = DataConfig(source=str(tmp_path), size=64, hflip=False, val_fraction=0.25, test_fraction=0.25)
    assert detect_layout(tmp_path) == "paired"
    got = splits_of(cfg, require_semantic=True, with_classes=True)
    names = [n for split in got.values() for n in split]
    assert sorted(names) == [f"s{k:02d}" for k in range(12)] and len(got) == 3  # disjoint, complete
    for split in got.values():
        for name, sample in split.items():
            assert_sample(sample, int(name[1:]))
            assert torch.equal(sample["classes"], expected(int(name[1:]))["classes"])
    # deterministic: the same names land in the same splits
    assert {s: sorted(v) for s, v in splits_of(cfg).items()} == {s: sorted(v) for s, v in got.items()}


def test_llvip_layout_keeps_official_test_and_carves_val_from_train(tmp_path):
    for k in range(10):
        split = "test" if k >= 7 else "train"
        write_pair(tmp_path / f"visible/{split}/0{k:04d}.jpg", tmp_path / f"infrared/{split}/0{k:04d}.jpg", k)
    cfg = DataConfig(source=str(tmp_path), size=64, val_fraction=0.3, test_fraction=0.0, hflip=False)
    assert detect_layout(tmp_path) == "llvip"
    got = splits_of(cfg)
    assert sorted(got["test"]) == [f"test/0{k:04d}" for k in (7, 8, 9)]
    assert sorted([*got["train"], *got["val"]]) == [f"train/0{k:04d}" for k in range(7)]
    for split in got.values():
        for name, sample in split.items():
            assert "semantic" not in sample
            assert_sample(sample, int(name[-4:]), tol=0.03)  # JPEG


def test_flir_aligned_layout_uses_its_list_files(tmp_path):
    for k in range(6):
        write_pair(tmp_path / f"JPEGImages/FLIR_{k:05d}_RGB.jpg",
                   tmp_path / f"JPEGImages/FLIR_{k:05d}_PreviewData.jpeg", k)
    (tmp_path / "align_train.txt").write_text("FLIR_00000\nFLIR_00001\nFLIR_00002\n")
    (tmp_path / "align_validation.txt").write_text("FLIR_00003\nFLIR_00004\n")  # FLIR_00005 is in no list
    cfg = DataConfig(source=str(tmp_path), size=64, val_fraction=0.0, hflip=False)
    assert detect_layout(tmp_path) == "flir"
    got = splits_of(cfg)
    assert sorted(got) == ["test", "train"]
    assert sorted(got["train"]) == ["FLIR_00000", "FLIR_00001", "FLIR_00002"]
    assert sorted(got["test"]) == ["FLIR_00003", "FLIR_00004"]
    assert_sample(got["test"]["FLIR_00004"], 4, tol=0.03)


def test_m3fd_layout_with_24bit_grey_infrared(tmp_path):
    for k in range(6):
        s = scene(k)
        save(tmp_path / f"Vis/{k:05d}.png", s.visible)
        save(tmp_path / f"Ir/{k:05d}.png", np.stack([s.infrared] * 3, -1))  # stored as RGB grey
    cfg = DataConfig(source=str(tmp_path), size=64, val_fraction=0.3, test_fraction=0.3, hflip=False)
    assert detect_layout(tmp_path) == "m3fd"
    got = splits_of(cfg)
    assert sum(len(v) for v in got.values()) == 6
    for split in got.values():
        for name, sample in split.items():
            assert_sample(sample, int(name))


def test_msrs_layout_with_day_and_night_names(tmp_path):
    for k in range(8):
        split, name = ("train" if k < 5 else "test"), f"{k:05d}{'DN'[k % 2]}"
        write_pair(tmp_path / f"{split}/vi/{name}.png", tmp_path / f"{split}/ir/{name}.png", k,
                   tmp_path / f"semantic/{split}/{name}.png")
    cfg = DataConfig(source=str(tmp_path), size=64, val_fraction=0.0, hflip=False)
    assert detect_layout(tmp_path) == "msrs"
    got = splits_of(cfg, require_semantic=True)
    assert sorted(got["train"]) == ["train/00000D", "train/00001N", "train/00002D", "train/00003N", "train/00004D"]
    assert sorted(got["test"]) == ["test/00005N", "test/00006D", "test/00007N"]
    assert_sample(got["test"]["test/00006D"], 6)


def test_a_flat_semantic_folder_serves_split_sub_folders_unless_a_bare_name_is_shared(tmp_path, caplog):
    """Maps named by bare name in a semantic folder without the split sub-folders (`semantic/00003.png` for
    `visible/train/00003.png`) are found, as generate and evaluate find them (`io.inputs.match_partners`). A bare
    name two samples share (`train/00001`, `test/00001`) is refused for both, saying why, and not silently given
    to one of them."""
    for k in range(6):
        split = "test" if k >= 4 else "train"
        write_pair(tmp_path / f"visible/{split}/{k:05d}.png", tmp_path / f"infrared/{split}/{k:05d}.png", k,
                   tmp_path / f"semantic/{k:05d}.png")
    cfg = DataConfig(source=str(tmp_path), size=64, val_fraction=0.0, test_fraction=0.0, hflip=False)
    got = splits_of(cfg, require_semantic=True, with_classes=True)
    assert sorted(got["train"]) == [f"train/{k:05d}" for k in range(4)]
    for split in got.values():
        for name, sample in split.items():
            assert_sample(sample, int(name[-5:]))

    write_pair(tmp_path / "visible/test/00001.png", tmp_path / "infrared/test/00001.png", 1)  # shares 00001
    with pytest.raises(DataError) as shared:
        build_dataset(cfg, "train", require_semantic=True)
    message = str(shared.value)
    assert str(tmp_path / "visible/train/00001.png") in message and "would go with 2 inputs" in message
    assert "\n" not in message
    skip = DataConfig(source=str(tmp_path), size=64, val_fraction=0.0, test_fraction=0.0, on_bad_sample="skip")
    assert [r.name for r in build_dataset(skip, "test", require_semantic=True).records] == ["test/00004", "test/00005"]
    assert len(build_dataset(skip, "train", require_semantic=True).records) == 3
    caplog.set_level(logging.INFO)
    assert main(["data", "inspect", str(tmp_path), "--out", str(tmp_path / "sheet.png")]) == 2
    assert f"{tmp_path / 'visible/test/00001.png'}: no semantic map named test/00001.* in" in caplog.text


@pytest.mark.parametrize("lists", [True, False])
def test_kaist_layout_with_and_without_list_files(tmp_path, lists):
    frames = {("set00", "V000"): [0, 1, 2], ("set01", "V001"): [3], ("set06", "V000"): [4, 5]}
    for (s, v), ks in frames.items():
        for k in ks:
            write_pair(tmp_path / f"{s}/{v}/visible/I{k:05d}.jpg", tmp_path / f"{s}/{v}/lwir/I{k:05d}.jpg", k)
    if lists:
        (tmp_path / "imageSets").mkdir()
        (tmp_path / "imageSets/train-all-02.txt").write_text(
            "set00/V000/I00000\nset00_V000_I00002\nset01/V001/I00003\n")  # both KAIST name styles
        (tmp_path / "imageSets/test-all-20.txt").write_text("set06/V000/I00005\n")
    cfg = DataConfig(source=str(tmp_path), size=64, val_fraction=0.0, hflip=False)
    assert detect_layout(tmp_path) == "kaist"
    got = splits_of(cfg)
    if lists:  # listed frames only
        assert sorted(got["train"]) == ["set00/V000/I00000", "set00/V000/I00002", "set01/V001/I00003"]
        assert sorted(got["test"]) == ["set06/V000/I00005"]
    else:  # sets 00-05 train, 06-11 test
        assert len(got["train"]) == 4 and sorted(got["test"]) == ["set06/V000/I00004", "set06/V000/I00005"]
    assert_sample(got["test"]["set06/V000/I00005"], 5, tol=0.03)


def test_triptych_files_are_split_into_panels(tmp_path):
    for k in range(5):
        s = scene(k)
        save(tmp_path / f"{'train' if k < 3 else 'test'}/t{k}.png",
             np.concatenate([s.visible, np.stack([s.infrared] * 3, -1), s.semantic], 1))
    cfg = DataConfig(source=str(tmp_path), size=64, val_fraction=0.0, hflip=False)
    assert detect_layout(tmp_path) == "triptych"
    got = splits_of(cfg, require_semantic=True, with_classes=True)
    assert sorted(got["train"]) == ["train/t0", "train/t1", "train/t2"]
    assert sorted(got["test"]) == ["test/t3", "test/t4"]
    assert_sample(got["test"]["test/t4"], 4)
    assert torch.equal(got["test"]["test/t4"]["classes"], expected(4)["classes"])


# ----------------------------------------------------------------------------------------------
# Tables: parquet and `datasets`


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return datasets


def _png(a):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _rows(ks, triptych=False):
    rows = []
    for k in ks:
        s = scene(k)
        if triptych:
            rows.append({"name": f"r{k}", "triptych": _png(np.concatenate([s.visible, np.stack([s.infrared] * 3, -1),
                                                                          s.semantic], 1))})
        else:
            rows.append({"name": f"r{k}", "visible": {"bytes": _png(s.visible), "path": None},
                         "infrared": {"bytes": _png(s.infrared), "path": None},
                         "panoptic_img": {"bytes": _png(s.semantic), "path": None}})
    return rows


def test_parquet_files_with_image_columns_and_split_names(tmp_path, hf_cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(_rows(range(4))), tmp_path / "data/train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(_rows(range(4, 6))), tmp_path / "data/test-00000-of-00001.parquet")
    cfg = DataConfig(source=str(tmp_path / "data"), size=64, val_fraction=0.0, hflip=False)
    got = splits_of(cfg, require_semantic=True, with_classes=True)
    assert sorted(got["train"]) == ["r0", "r1", "r2", "r3"] and sorted(got["test"]) == ["r4", "r5"]
    assert_sample(got["train"]["r2"], 2)
    assert torch.equal(got["test"]["r5"]["classes"], expected(5)["classes"])
    glob_cfg = DataConfig(source=str(tmp_path / "data/train-*.parquet"), size=64, hflip=False,
                          val_fraction=0.0, test_fraction=0.0)
    assert len(build_dataset(glob_cfg, "train")) == 4  # a glob; the split still comes from the file name


def test_parquet_with_one_triptych_column(tmp_path, hf_cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(_rows(range(6), triptych=True)), tmp_path / "triptychs.parquet")
    cfg = DataConfig(source=str(tmp_path / "triptychs.parquet"), size=64, hflip=False, val_fraction=0.3,
                     test_fraction=0.3)
    got = splits_of(cfg, require_semantic=True)
    assert sorted(n for v in got.values() for n in v) == [f"r{k}" for k in range(6)]
    for split in got.values():
        for name, sample in split.items():
            assert_sample(sample, int(name[1:]))


def test_datasets_folder_saved_to_disk(tmp_path, hf_cache):
    datasets = hf_cache
    features = datasets.Features({"name": datasets.Value("string"), "visible": datasets.Image(),
                                  "infrared": datasets.Image(), "panoptic_img": datasets.Image()})
    table = datasets.DatasetDict({
        split: datasets.Dataset.from_list(_rows(ks), features=features)
        for split, ks in (("train", range(3)), ("validation", range(3, 5)))
    })
    table.save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(source=str(tmp_path / "saved"), size=64, hflip=False)
    got = splits_of(cfg)
    assert sorted(got["train"]) == ["r0", "r1", "r2"] and sorted(got["val"]) == ["r3", "r4"]
    assert_sample(got["val"]["r4"], 4)
    batch = collate(list(got["train"].values()))
    assert batch["visible"].shape == (3, 3, 64, 64) and batch["name"] == list(got["train"])


def test_table_without_image_columns_names_the_settings(tmp_path, hf_cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vis2ir.data import DataError

    pq.write_table(pa.table({"rgb": [b"x"], "thermal": [b"y"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: no image columns 'visible' \+ 'infrared'.*rgb, thermal.*"
                                        r"data\.visible_column"):
        build_dataset(DataConfig(source=str(tmp_path / "t.parquet")), "train")


# ----------------------------------------------------------------------------------------------
# A folder inside a known layout, and the formats listings take (issue 15)


@pytest.mark.parametrize("layout, files, given, part, top", [
    ("llvip", ("visible/train/0.jpg", "infrared/train/0.jpg"), "visible", "visible", "."),
    ("llvip", ("visible/train/0.jpg", "infrared/train/0.jpg"), "visible/train", "visible/train", "."),
    ("llvip", ("visible/train/0.jpg", "infrared/train/0.jpg"), "infrared", "infrared", "."),
    ("paired", ("visible/0.png", "infrared/0.png"), "visible", "visible", "."),
    ("m3fd", ("Vis/0.png", "Ir/0.png"), "Ir", "Ir", "."),
    ("msrs", ("train/vi/0.png", "train/ir/0.png"), "train", "train", "."),
    ("msrs", ("train/vi/0.png", "train/ir/0.png"), "train/vi", "train/vi", "."),
    ("kaist", ("set00/V000/visible/I00000.jpg", "set00/V000/lwir/I00000.jpg"), "set00/V000/visible",
     "set00/V000/visible", "."),
])
def test_a_folder_inside_a_known_layout_names_the_layout(tmp_path, layout, files, given, part, top):
    """`data.source=LLVIP/visible` is answered with the folder to give, not read as triptychs."""
    root = tmp_path / "DATA"
    write_pair(root / files[0], root / files[1], 0)
    assert detect_layout(root) == layout
    with pytest.raises(DataError) as err:
        open_source(DataConfig(source=str(root / given)))
    message = str(err.value)
    assert f"this is the {part} folder of the " in message and f"data.source={root}" in message
    assert ("give its parent" in message) == ("/" not in given) and "\n" not in message


def test_a_triptych_folder_beside_a_layout_is_still_triptychs(tmp_path):
    write_pair(tmp_path / "visible/0.png", tmp_path / "infrared/0.png", 0)
    save(tmp_path / "triptychs/t0.png", np.zeros((16, 48, 3), np.uint8))
    assert detect_layout(tmp_path / "triptychs") == "triptych"


def test_gif_and_other_formats_are_read_or_named_as_skipped(tmp_path, caplog):
    """GIF (its first frame), PPM and TGA are samples like PNG; a PSD (Pillow reads it, vis2ir does not)
    is named as skipped, in the log and in `data inspect`'s report."""
    import logging

    from PIL import Image

    from vis2ir.data import inspect_source

    caplog.set_level(logging.INFO)
    for k, suffix in enumerate((".gif", ".ppm", ".tga", ".png")):
        write_pair(tmp_path / f"visible/s{k}{suffix}", tmp_path / f"infrared/s{k}.png", k)
    Image.fromarray(scene(0).visible).save(tmp_path / "visible/extra.psd", format="PNG")  # suffix is what counts
    cfg = DataConfig(source=str(tmp_path), size=64, hflip=False, val_fraction=0, test_fraction=0)
    found, _ = open_source(cfg)
    assert sorted(r.name for r in found.records) == ["s0", "s1", "s2", "s3"]
    assert "1 image files of formats vis2ir does not read (.psd) are skipped" in found.skipped
    ds = build_dataset(cfg, "train")
    assert "extra.psd" in caplog.text
    samples = {ds[i]["name"]: ds[i] for i in range(len(ds))}
    assert_sample(samples["s1"], 1)  # PPM: exact
    assert_sample(samples["s2"], 2)  # TGA: exact
    assert samples["s0"]["visible"].shape == (3, 64, 64)  # GIF: its first frame, palette-quantised
    assert (samples["s0"]["visible"] - expected(0)["visible"]).abs().mean() < 0.05
    report = inspect_source(cfg, mode="none")
    assert "extra.psd" in report["skipped"] and report["problems"] == []


WAYS_OUT = ("vis2ir segment --input", "data.semantic_source=auto", "model.semantic.mode=none")


def test_every_missing_semantic_maps_message_says_the_three_ways_out(tmp_path):
    from vis2ir.data.folders import FileReader

    for k in range(4):
        write_pair(tmp_path / f"visible/train/s{k}.png", tmp_path / f"infrared/train/s{k}.png", k,
                   tmp_path / f"semantic/train/s{k}.png" if k == 0 else None)
    cfg = DataConfig(source=str(tmp_path), size=64, val_fraction=0, test_fraction=0)
    with pytest.raises(DataError) as some:  # 3 of 4 lack a map
        build_dataset(cfg, "train", require_semantic=True)
    (tmp_path / "semantic/train/s0.png").unlink()
    with pytest.raises(DataError) as none:  # all lack one
        build_dataset(cfg, "train", require_semantic=True)
    with pytest.raises(DataError) as classes:
        build_dataset(cfg, "train", with_classes=True)
    found, reader = open_source(cfg)
    with pytest.raises(DataError) as opened:
        FileReader(tmp_path / "semantic").open(found.records[0], semantic=True)
    assert "3 of 4 samples of split 'train' lack one" in str(some.value)
    assert f"vis2ir segment --input {tmp_path / 'visible'} --out {tmp_path / 'semantic'} --recursive" in str(none.value)
    for err in (some, none, classes, opened):
        assert all(way in str(err.value) for way in WAYS_OUT), str(err.value)
        assert "\n" not in str(err.value)


def test_a_table_without_semantic_maps_says_how_to_get_them(tmp_path, hf_cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{k: v for k, v in row.items() if k != "panoptic_img"} for row in _rows([0, 1])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    cfg = DataConfig(source=str(tmp_path / "train.parquet"), size=64, val_fraction=0, test_fraction=0)
    with pytest.raises(DataError) as err:
        build_dataset(cfg, "train", require_semantic=True)
    message = str(err.value)
    assert "vis2ir data convert" in message and all(way in message for way in WAYS_OUT), message


def test_when_every_map_is_refused_the_message_says_why(tmp_path):
    """Maps there but none taken (each bare name in a flat semantic folder shared by a train and a test sample):
    the message says why for the first sample, not that there are no maps."""
    for k in range(2):
        for split in ("train", "test"):
            write_pair(tmp_path / f"visible/{split}/{k:05d}.png", tmp_path / f"infrared/{split}/{k:05d}.png", k,
                       tmp_path / f"semantic/{k:05d}.png")
    cfg = DataConfig(source=str(tmp_path), size=64, val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(DataError) as refused:
        build_dataset(cfg, "train", require_semantic=True)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'visible/train/00000.png'}: no semantic map named train/00000.*")
    assert "would go with 2 inputs (test/00000, train/00000)" in message and "\n" not in message
