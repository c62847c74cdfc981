"""ThermalScenes: deterministic, any size, fast, consistent panels, and semantics are necessary."""

import time

import numpy as np
import pytest
import torch
from PIL import Image

from vis2ir.config import DataConfig
from vis2ir import palette
from vis2ir.data import SPLITS, ThermalScenes, build_dataset, make_loader, render_scene, write_thermalscenes
from vis2ir.data.thermalscenes import CAR, CAR_RUNNING, PERSON, SCENE_CLASSES, STATUE
from vis2ir.evaluate.baselines import ClassMeanPredictor, ColourLookupPredictor, ConstantPredictor
from vis2ir.evaluate.metrics import psnr_ssim


def test_scenes_are_deterministic_by_seed_and_index():
    a, b, c = render_scene(3, seed=1, size=64), render_scene(3, seed=1, size=64), render_scene(3, seed=2, size=64)
    for kind in ("visible", "infrared", "semantic", "classes"):
        assert np.array_equal(getattr(a, kind), getattr(b, kind))
    assert not np.array_equal(a.visible, c.visible)


def test_any_resolution_and_the_same_scene_at_every_size():
    s = render_scene(0, size=(48, 80))
    assert s.visible.shape == (48, 80, 3) and s.infrared.shape == (48, 80) and s.classes.shape == (48, 80)
    small = render_scene(5, size=64).classes
    large = render_scene(5, size=256).classes
    down = np.asarray(Image.fromarray(large.astype(np.uint8)).resize((64, 64), Image.Resampling.NEAREST))
    assert (down == small).mean() > 0.85


def test_semantic_panel_is_the_class_map_in_palette_colours():
    for i in range(5):
        s = render_scene(i, size=64)
        assert np.array_equal(palette.decode(s.semantic)[0], s.classes)
        assert set(np.unique(s.classes)) <= set(SCENE_CLASSES)


def test_rendering_speed_at_256():
    """At least 50 scenes/s on one core (CPU time of this process, so other jobs do not count)."""
    render_scene(0, size=256)
    best = 0.0
    for attempt in range(3):
        t = time.process_time()
        for i in range(12):
            render_scene(100 * attempt + i, size=256)
        best = max(best, 12 / (time.process_time() - t))
    assert best >= 50, f"{best:.0f} scenes/s at 256x256 (target 50)"


def test_lookalikes_differ_only_in_temperature():
    """Running and parked cars, persons and statues: alike in the visible, apart in the infrared."""
    scenes = ThermalScenes(150, 64, seed=3)
    stats = {c: [[], []] for c in (CAR, CAR_RUNNING, PERSON, STATUE)}
    for i in range(len(scenes)):
        s = scenes[i]
        for c, (vis, ir) in stats.items():
            mask = s["classes"] == c
            if mask.any():
                vis.append(s["visible"][:, mask].mean(1))
                ir.append(s["infrared"][0, mask].mean())
    mean = {c: (torch.stack(v).mean(0), torch.stack(t).mean()) for c, (v, t) in stats.items()}
    for hot, cold in ((CAR_RUNNING, CAR), (PERSON, STATUE)):
        assert (mean[hot][0] - mean[cold][0]).abs().max() < 0.06  # same looks
        assert mean[hot][1] - mean[cold][1] > 0.1  # different heat


def test_semantics_are_necessary():
    """On held-out scenes the per-class-mean oracle beats the best visible-colour predictor by >= 3 dB."""
    train = [ThermalScenes(400, 64, seed=1)[i] for i in range(400)]
    test = [ThermalScenes(64, 64, seed=2)[i] for i in range(64)]
    target = torch.stack([s["infrared"] for s in test])

    def score(predictor):  # mean PSNR of the held-out images, each at its own 64x64
        return psnr_ssim(torch.stack([predictor.predict(s) for s in test]), target, protocol="native")["psnr"]

    oracle = score(ClassMeanPredictor.fit(train))
    visible = max(score(ColourLookupPredictor.fit(train, levels)) for levels in (4, 8, 16, 32, 64))
    constant = score(ConstantPredictor.fit(train))
    assert oracle - visible >= 3.0, f"oracle {oracle:.2f} dB, best visible-only {visible:.2f} dB"
    assert visible > constant + 3


def test_build_dataset_splits_are_disjoint_deterministic_and_only_train_flips():
    cfg = DataConfig(size=16, synth_count=200, val_fraction=0.1, test_fraction=0.1)
    names = {}
    for split in SPLITS:
        ds = build_dataset(cfg, split)
        names[split] = [ds[i]["name"] for i in range(len(ds))]
        assert ds.indices == build_dataset(cfg, split).indices
        assert ds.flip == (split == "train")
    assert sum(map(len, names.values())) == 200 and len(set().union(*names.values())) == 200
    assert 10 <= len(names["val"]) <= 30 and 10 <= len(names["test"]) <= 30
    cfg.size = 32
    sample = build_dataset(cfg, "val")[0]
    assert set(sample) == {"visible", "infrared", "semantic", "name", "classes"}
    assert sample["classes"].dtype == torch.long and sample["visible"].shape == (3, 32, 32)
    assert "semantic" not in build_dataset(cfg, "val", require_semantic=False)[0]


def test_flip_keeps_classes_with_their_pixels():
    ds = ThermalScenes(1, 32, flip=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        s = ds[0]
        assert torch.equal(palette.decode_classes(s["semantic"]), s["classes"])
        seen.add(s["visible"][:, :, 0].sum().item())
    assert len(seen) == 2  # flipped and not


@pytest.mark.parametrize("fmt", ["folder", "parquet"])
def test_synth_output_reads_back_identical_to_memory(tmp_path, monkeypatch, fmt):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    source = write_thermalscenes(tmp_path / "out", count=60, size=32, seed=4, fmt=fmt)
    memory = DataConfig(size=32, synth_count=60, synth_seed=4, hflip=False, val_fraction=0.2, test_fraction=0.2)
    disk = DataConfig(source=str(source), size=32, hflip=False, val_fraction=0.2, test_fraction=0.2)
    for split in SPLITS:
        a, b = build_dataset(memory, split), build_dataset(disk, split, require_semantic=True, with_classes=True)
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            x, y = a[i], b[i]
            assert x["name"] == y["name"]
            for key in ("visible", "infrared", "semantic", "classes"):
                assert torch.equal(x[key], y[key]), (split, x["name"], key)


def test_loader_with_workers_batches_thermalscenes():
    ds = ThermalScenes(10, 32, seed=0)
    batches = list(make_loader(ds, batch_size=4, num_workers=2))
    assert [len(b["name"]) for b in batches] == [4, 4, 2]
    assert batches[0]["visible"].shape == (4, 3, 32, 32) and batches[0]["classes"].shape == (4, 32, 32)
    assert batches[0]["name"][0] == "scene_000000"
