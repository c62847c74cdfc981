"""`data.semantic_source: boxes` and `generate --boxes`: semantic maps drawn from detection boxes, read like the
data sets ship them (issue "Boxes, not masks")."""

from pathlib import Path

import numpy as np
import pytest

from vis2ir.config import load_config
from vis2ir.data import DataError, build_dataset, inspect_source
from vis2ir.palette import CLASS_IDS, decode

from datafiles import write_pair

REAL = Path(__file__).resolve().parents[3] / "shared" / "real" / "msrs"
SIZE = 64


def yolo_set(root: Path, count: int = 6, label_names=("person", "car"), missing=()) -> Path:
    """An LLVIP-layout folder (visible/ infrared/ with train and test) and YOLO labels in labels/, a person box on
    the left half and a car box on the right of every image."""
    for k in range(count):
        split = "test" if k % 3 == 0 else "train"
        write_pair(root / "visible" / split / f"{k:02d}.png", root / "infrared" / split / f"{k:02d}.png", k)
        if k in missing:
            continue
        label = root / "labels" / split / f"{k:02d}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("0 0.25 0.5 0.25 0.5\n1 0.75 0.5 0.25 0.25\n")
    (root / "labels" / "classes.txt").write_text("".join(f"{n}\n" for n in label_names))
    return root


def boxes_config(root: Path, *overrides):
    return load_config(None, [f"data.source={root}", "data.semantic_source=boxes", f"data.boxes={root / 'labels'}",
                              f"data.size={SIZE}", "data.resize_policy=resize", "data.hflip=false", "data.num_workers=0", *overrides]).data


def classes_of(semantic) -> np.ndarray:
    return decode((semantic.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))[0]


def test_a_yolo_folder_trains_with_box_maps(tmp_path):
    root = yolo_set(tmp_path / "set")
    data = build_dataset(boxes_config(root), "train", require_semantic=True)
    assert len(data) == 4
    classes = classes_of(data.load(0)["semantic"])
    assert classes[32, 16] == CLASS_IDS["person"] and classes[32, 48] == CLASS_IDS["car"]
    assert classes[2, 2] == CLASS_IDS["background"]  # outside every box: declared background, not unknown


def test_box_maps_are_checked_like_files(tmp_path, caplog):
    root = yolo_set(tmp_path / "set", missing=(1,))
    data = build_dataset(boxes_config(root), "train", require_semantic=True)
    assert "1 of 6 samples have no box annotations" in caplog.text  # drawn as background only
    sample = next(data.load(i) for i in range(len(data)) if data.records[i].name == "train/01")
    assert (classes_of(sample["semantic"]) == CLASS_IDS["background"]).all()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "zz.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DataError, match=r"data.boxes=.*no box annotations for any sample"):
        build_dataset(boxes_config(root, f"data.boxes={elsewhere}"), "train", require_semantic=True)

    other = yolo_set(tmp_path / "other", label_names=("person", "tricycle"))
    with pytest.raises(DataError, match="tricycle.*data.box_classes"):
        build_dataset(boxes_config(other), "train", require_semantic=True)
    mapped = build_dataset(boxes_config(other, "data.box_classes=[tricycle=bicycle]"), "train", require_semantic=True)
    assert classes_of(mapped.load(0)["semantic"])[32, 48] == CLASS_IDS["bicycle"]


def test_data_inspect_shows_box_maps(tmp_path, caplog):
    caplog.set_level("INFO")
    root = yolo_set(tmp_path / "set")
    report = inspect_source(boxes_config(root), out=tmp_path / "sheet.png", count=3, mode="channel_concat")
    assert report["semantic"] == 6 and report["boxes"] == "yolo" and not report["problems"]
    assert "drawn from the yolo boxes" in caplog.text
    assert (tmp_path / "sheet.png").stat().st_size > 0


def test_data_inspect_takes_the_source_from_its_argument(tmp_path, caplog):
    """`vis2ir data inspect SOURCE data.semantic_source=boxes …`: the folder given replaces the default source
    (ThermalScenes, which has no boxes) before anything is checked."""
    from vis2ir.cli import main

    caplog.set_level("INFO")
    root = yolo_set(tmp_path / "set")
    assert main(["data", "inspect", str(root), "--out", str(tmp_path / "s.png"), "data.semantic_source=boxes",
                 f"data.boxes={root / 'labels'}", "data.size=64", "model.semantic.mode=channel_concat"]) == 0
    assert "semantic maps: 6 of 6 (drawn from the yolo boxes" in caplog.text
    assert main(["data", "inspect", "thermalscenes", "--out", str(tmp_path / "t.png"),
                 "data.semantic_source=boxes", f"data.boxes={root / 'labels'}"]) == 2


def test_generate_draws_maps_from_boxes(tiny_config, tmp_path):
    from vis2ir.errors import Vis2IRError
    from vis2ir.generate import run_generate

    root = yolo_set(tmp_path / "set")
    cfg = tiny_config("model.codec=pixel", "model.semantic.mode=channel_concat")
    config = tmp_path / "model.yaml"
    cfg.save(config)
    photos, labels = root / "visible" / "train", root / "labels" / "train"
    summary = run_generate(photos, tmp_path / "out", config=config, boxes=labels, compare=True, steps=1)
    assert sorted(summary.done) == ["01", "02", "04", "05"]
    assert (tmp_path / "out" / "compare" / "01.png").is_file()
    with pytest.raises(Vis2IRError, match="--boxes and --semantic"):
        run_generate(photos, tmp_path / "out2", config=config, boxes=labels, semantic=labels)
    with pytest.raises(Vis2IRError, match="no box annotations for any input"):
        run_generate(photos, tmp_path / "out3", config=config, boxes=root / "labels" / "test", steps=1)
    # a category without a palette class is a setting to give: the run stops once, before any output
    other = yolo_set(tmp_path / "other", label_names=("person", "tricycle"))
    with pytest.raises(Vis2IRError, match="'tricycle' is no palette class; map it with --box-classes") as err:
        run_generate(other / "visible" / "train", tmp_path / "out4", config=config, boxes=other / "labels", steps=1)
    assert "\n" not in str(err.value) and not (tmp_path / "out4").exists() or not any((tmp_path / "out4").iterdir())
    done = run_generate(other / "visible" / "train", tmp_path / "out5", config=config, boxes=other / "labels",
                        box_classes=["tricycle=bicycle"], steps=1)
    assert len(done.done) == 4


@pytest.mark.skipif(not REAL.is_dir(), reason="the real MSRS pairs (../shared/real/msrs) are not here")
@pytest.mark.parametrize("modality", ["visible", "infrared"])
def test_data_inspect_reads_msrs_labels_as_box_maps(tmp_path, modality):
    cfg = load_config(None, [f"data.source={REAL}", "data.semantic_source=boxes",
                             f"data.boxes={REAL / 'labels' / modality}", "data.size=64"]).data
    report = inspect_source(cfg, out=tmp_path / "sheet.png", count=4, mode="channel_concat")
    assert report["counts"]["test"] == 73 and sum(report["counts"].values()) == 361  # val: carved from train
    assert report["semantic"] == 361 and report["boxes"] == "yolo" and report["problems"] == []
