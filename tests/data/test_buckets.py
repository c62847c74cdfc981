"""Aspect-ratio buckets: the bucket list, which sample goes where, and batches of one shape."""

import math
from collections import Counter

import pytest
import torch

from vis2ir.config import load_config
from vis2ir.data import build_dataset, make_loader, write_thermalscenes
from vis2ir.data.buckets import MIN_AREA, assign, bucket_shapes, epoch_order, group, nearest_bucket
from vis2ir.data.errors import DataError
from vis2ir.data.synth import parse_shapes

from tests.data.datafiles import save, scene

MIXED = [(160, 96), (64, 64), (96, 160), (100, 100)]  # at size 64: buckets 80x48, 64x64, 48x80, 64x64


@pytest.mark.parametrize("size", [64, 144, 512, 768, 1024])
def test_buckets_are_multiples_of_16_of_about_size_squared(size):
    shapes = bucket_shapes(size, 2.0)
    assert (size, size) in shapes and len(set(shapes)) == len(shapes)
    for w, h in shapes:
        assert w % 16 == 0 and h % 16 == 0
        assert MIN_AREA * size * size <= w * h <= size * size
        assert max(w, h) <= 2.0 * min(w, h)
        assert (h, w) in shapes  # portrait buckets mirror landscape ones
    assert max(w / h for w, h in bucket_shapes(size, 1.5)) <= 1.5


def test_a_sample_goes_to_the_nearest_aspect():
    # The data sets of the field: LLVIP 1280×1024 and FLIR 640×512 are 5:4, M3FD 1024×768 and MSRS 640×480 4:3.
    at512 = bucket_shapes(512, 2.0)
    assert nearest_bucket(1280, 1024, at512) == nearest_bucket(640, 512, at512) == (560, 448)  # exactly 5:4
    assert nearest_bucket(1024, 768, at512) == nearest_bucket(640, 480, at512) == (576, 432)  # exactly 4:3
    assert nearest_bucket(512, 640, at512) == (448, 560) and nearest_bucket(300, 300, at512) == (512, 512)
    assert nearest_bucket(4000, 1000, at512)[0] / nearest_bucket(4000, 1000, at512)[1] <= 2.0  # capped
    assert nearest_bucket(640, 512, bucket_shapes(144, 2.0)) == (160, 128)
    assert nearest_bucket(640, 512, bucket_shapes(1024, 2.0)) == (1120, 896)
    # the nearest in log aspect among all buckets
    for w, h in [(640, 512), (1000, 333), (333, 1000), (700, 500)]:
        got = nearest_bucket(w, h, at512)
        best = min(abs(math.log(a / b) - math.log(w / h)) for a, b in at512)
        assert abs(abs(math.log(got[0] / got[1]) - math.log(w / h)) - best) < 1e-9


def test_epoch_order_runs_of_one_shape_every_sample_each_epoch():
    shapes = [(80, 48)] * 7 + [(64, 64)] * 5 + [(48, 80)] * 2
    order = epoch_order(shapes, chunk=4, seed=3)
    assert len(order) == 8 + 8 + 4  # each shape padded up to whole runs of 4
    runs = order.view(-1, 4).tolist()
    assert all(len({shapes[i] for i in run}) == 1 for run in runs)
    assert set(order.tolist()) == set(range(len(shapes)))  # every sample, every epoch
    big = {s for s, n in Counter(shapes).items() if n >= 4}  # padding repeats no sample inside their runs
    assert all(len(set(run)) == 4 for run in runs if shapes[run[0]] in big)
    assert torch.equal(order, epoch_order(shapes, 4, 3)) and not torch.equal(order, epoch_order(shapes, 4, 4))


def mixed_folder(root, shapes=MIXED, count=12):
    write_thermalscenes(root, count, seed=2, shapes=shapes)
    return root


def folder_config(root, *overrides):
    return load_config(None, [f"data.source={root}", "data.size=64", "data.resize_policy=bucket",
                              "data.val_fraction=0", "data.test_fraction=0", "data.num_workers=0", *overrides])


def test_every_sample_is_in_exactly_one_bucket_at_its_shape(tmp_path):
    cfg = folder_config(mixed_folder(tmp_path / "ts"))
    data = build_dataset(cfg.data, "train")
    assert len(data.shapes) == len(data) == 12
    by_name = {data.records[i].name: s for i, s in enumerate(data.shapes)}
    for i, name in enumerate(sorted(by_name)):  # scene_000000 .. scene_000011: shapes in turn
        assert by_name[name] == {0: (80, 48), 1: (64, 64), 2: (48, 80), 3: (64, 64)}[i % 4]
    groups = group(data.shapes)
    assert sorted(i for idx in groups.values() for i in idx) == list(range(len(data)))
    for i in (0, 1, 2):
        w, h = data.shapes[i]
        sample = data[i]
        assert all(sample[k].shape == (3, h, w) for k in ("visible", "infrared", "semantic"))
    # The square policies are unchanged: every panel size × size.
    square = build_dataset(folder_config(tmp_path / "ts", "data.resize_policy=center_crop").data, "train")
    assert set(square.shapes) == {(64, 64)} and square[0]["visible"].shape == (3, 64, 64)


def test_exif_rotated_photos_go_to_their_upright_bucket(tmp_path):
    from PIL import Image

    s = scene(0, (64, 96))  # 96 wide, 64 high, stored on its side with orientation 6 (rotate 90°)
    exif = Image.Exif()
    exif[0x0112] = 6
    for kind, a in (("visible", s.visible), ("infrared", s.infrared)):
        save(tmp_path / "d" / kind / "train" / "a.png", a.swapaxes(0, 1)[::-1].copy(), exif=exif)
    data = build_dataset(folder_config(tmp_path / "d").data, "train")
    assert data.shapes == [(80, 48)] and data[0]["visible"].shape == (3, 48, 80)


def test_loaders_batch_one_shape_at_a_time(tmp_path):
    data = build_dataset(folder_config(mixed_folder(tmp_path / "ts")).data, "train")
    for shuffle in (False, True):
        seen = []
        for batch in make_loader(data, batch_size=2, shuffle=shuffle):
            assert len({tuple(t.shape) for t in batch["visible"]}) == 1
            seen += batch["name"]
        assert sorted(seen) == sorted(r.name for r in data.records)


def test_synth_shapes_are_parsed_with_one_line_errors(tmp_path):
    assert parse_shapes("640x512, 512X640") == [(640, 512), (512, 640)]
    for bad in ("640", "640x", "ax512", "8x512", "640x512,"):
        with pytest.raises(DataError, match=r"--shapes .*expected WIDTHxHEIGHT"):
            parse_shapes(bad)
