"""Semantic maps that are mostly unlabelled (VOID, e.g. drawn from detection boxes) are named by `data inspect`
and warned about by training, generate and evaluate (issue 26, item 11)."""

import logging
from pathlib import Path

import numpy as np
import pytest
from datafiles import save, scene, write_pair
from PIL import Image

from vis2ir.config import DataConfig
from vis2ir.data import build_dataset, inspect_source
from vis2ir.data import coverage
from vis2ir.data.coverage import VOID_LIMIT, void_share
from vis2ir.palette import CLASS_IDS, colourise


def box_map(k: int, size: int = 64) -> np.ndarray:
    """A map drawn from one detection box: a person box on black (VOID), about 8 % labelled."""
    classes = np.full((size, size), -1)
    x = 8 + 3 * k % 30
    classes[20:38, x:x + 18] = CLASS_IDS["person"]
    return colourise(classes)


def folder(root, n=8, boxes=True):
    for k in range(n):
        write_pair(root / f"visible/s{k}.png", root / f"infrared/s{k}.png", k)
        save(root / f"semantic/s{k}.png", box_map(k) if boxes else scene(k).semantic)
    return root


def config(root):
    return DataConfig(source=str(root), size=32, val_fraction=0.0, test_fraction=0.0)


def test_void_share_of_box_maps_and_full_maps():
    assert void_share(box_map(0)) > 0.9 > VOID_LIMIT
    assert void_share(scene(0).semantic) < 0.05


def test_data_inspect_names_mostly_void_maps_as_a_problem(tmp_path):
    report = inspect_source(config(folder(tmp_path / "boxes")), mode="cross_attention")
    void = [p for p in report["problems"] if "mostly unlabelled" in p]
    assert len(void) == 1 and "8 of 8 semantic maps checked" in void[0] and "e.g. s" in void[0]
    assert "vis2ir segment" in void[0] and "model.semantic.mode=none" in void[0] and "\n" not in void[0]
    full = inspect_source(config(folder(tmp_path / "full", boxes=False)), mode="cross_attention")
    assert not [p for p in full["problems"] if "mostly unlabelled" in p]


def test_training_data_with_mostly_void_maps_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="vis2ir.data"):
        data = build_dataset(config(folder(tmp_path / "boxes")), "train", require_semantic=True)
    assert len(data) == 8  # a warning, not an error
    assert "8 of 8 semantic maps checked are mostly unlabelled (more than 80% VOID" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vis2ir.data"):
        build_dataset(config(folder(tmp_path / "full", boxes=False)), "train", require_semantic=True)
    assert "mostly unlabelled" not in caplog.text


def test_a_given_mostly_void_map_is_warned_about_once(monkeypatch, caplog):
    from vis2ir.pipeline import check_map

    monkeypatch.setattr(coverage, "_warned", set())
    photo = Image.fromarray(scene(0).visible)
    with caplog.at_level(logging.WARNING, logger="vis2ir.data"):
        for k in range(3):
            check_map(Image.fromarray(box_map(k)), photo, f"maps/m{k}.png", "photo.png")
        check_map(Image.fromarray(scene(0).semantic), photo, "maps/full.png", "photo.png")
    said = [r.getMessage() for r in caplog.records if "unlabelled" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("maps/m0.png: 9") and "vis2ir segment" in said[0]


REAL = Path(__file__).resolve().parents[3] / "shared" / "real" / "msrs"


@pytest.mark.skipif(not REAL.is_dir(), reason="the real MSRS pairs (../shared/real/msrs) are not here")
def test_maps_drawn_from_msrs_boxes_are_a_problem_for_data_inspect(tmp_path):
    """The issue's case: semantic maps drawn from MSRS' YOLO boxes (person, bicycle, car) on VOID."""
    import shutil

    ids = [CLASS_IDS["person"], CLASS_IDS["bicycle"], CLASS_IDS["car"]]
    written = 0
    for vis in sorted((REAL / "visible" / "test").glob("*.jpg")):
        boxes = (REAL / "labels" / "visible" / "test" / f"{vis.stem}.txt").read_text().split("\n")
        boxes = [[float(v) for v in line.split()] for line in boxes if line.strip()]
        if not boxes:
            continue
        classes = np.full((480, 640), -1)
        for c, cx, cy, w, h in boxes:
            x0, x1 = int((cx - w / 2) * 640), int((cx + w / 2) * 640)
            y0, y1 = int((cy - h / 2) * 480), int((cy + h / 2) * 480)
            classes[max(y0, 0):y1, max(x0, 0):x1] = ids[int(c)]
        (tmp_path / "visible").mkdir(exist_ok=True)
        shutil.copy(vis, tmp_path / "visible" / vis.name)
        save(tmp_path / "infrared" / f"{vis.stem}.png", np.asarray(Image.open(REAL / "infrared" / "test" /
                                                                               f"{vis.stem}.png")))
        save(tmp_path / "semantic" / f"{vis.stem}.png", colourise(classes))
        written += 1
        if written == 12:
            break
    report = inspect_source(config(tmp_path), mode="cross_attention")
    void = [p for p in report["problems"] if "mostly unlabelled" in p]
    assert len(void) == 1 and f"of {written} semantic maps checked are mostly unlabelled" in void[0]
