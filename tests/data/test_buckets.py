"""Aspect-ratio buckets: the bucket list, which sample goes where, and batches of one shape."""

import math
import random
from collections import Counter

import pytest
import torch

from vis2ir.config import load_config
from vis2ir.data import build_dataset, make_loader, write_thermalscenes
from vis2ir.data.buckets import (MIN_AREA, REPEAT_SHARE, assign, bucket_shapes, epoch_order, group, merge_small,
                                 nearest_bucket)
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


def _repeats(order) -> tuple[int, int]:
    """(positions of an epoch that read a sample again, the most reads of one sample)."""
    counts = Counter(order.tolist())
    return len(order) - len(counts), max(counts.values())


def issue_photos(odd: int = 200, seed: int = 0) -> list[tuple[int, int]]:
    """The issue's 2000 photos: 1800 of 640×480 and `odd` of random sizes, at size 512 (61 buckets)."""
    rng = random.Random(seed)
    sizes = [(640, 480)] * (2000 - odd) + [(rng.randint(300, 1200), rng.randint(300, 1200)) for _ in range(odd)]
    return assign(sizes, 512, 2.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_buckets_reweight_nothing_2000_mixed_photos_on_8_gpus_at_batch_4(seed):
    shapes, chunk = issue_photos(seed=seed), 32
    merged = merge_small(shapes, chunk)
    for epoch in range(3):
        order = epoch_order(merged, chunk, seed=100003 + epoch)
        runs = order.view(-1, chunk).tolist()
        assert all(len({merged[i] for i in run}) == 1 for run in runs)  # one shape per global batch
        repeats, most = _repeats(order)
        assert most <= 2 and repeats <= REPEAT_SHARE * len(order)
        assert set(order.tolist()) == set(range(len(shapes)))  # every photo, every epoch
    # the 10 % odd photos take at most their share and the repeats of an epoch, not 50 % of the updates
    order = epoch_order(merged, chunk, 7)
    assert sum(1 for i in order.tolist() if i >= 1800) <= 200 + REPEAT_SHARE * len(order)
    moved = [i for i, (a, b) in enumerate(zip(shapes, merged)) if a != b]
    assert moved and all(i >= 1800 for i in moved)  # only odd photos change shape, to one of the kept ones
    assert set(merged) <= set(shapes)


@pytest.mark.parametrize("counts,chunk", [((3, 6, 3), 2), ((3, 6, 3), 4), ((1, 40, 1, 2), 8), ((33,) * 20, 32),
                                          ((700, 5, 60, 31), 32), ((100,), 16)])
def test_merged_buckets_hold_a_global_batch_and_repeat_little(counts, chunk):
    shapes = [s for n, s in zip(counts, [(80, 48), (64, 64), (48, 80), (96, 32)]) for _ in range(n)] \
        if len(counts) <= 4 else [(16 * (k + 2), 16 * (k + 1)) for k, n in enumerate(counts) for _ in range(n)]
    merged = merge_small(shapes, chunk)
    assert merged == merge_small(shapes, chunk)  # a pure function: every rank and resume alike
    sizes = Counter(merged)
    assert len(sizes) == 1 or min(sizes.values()) >= chunk
    order = epoch_order(merged, chunk, seed=5) if len(sizes) > 1 else torch.arange(len(merged))
    repeats, most = _repeats(order)
    assert most <= 2
    assert repeats <= max(REPEAT_SHARE * len(order), chunk)
    if len(shapes) >= 20 * chunk:
        assert repeats <= REPEAT_SHARE * len(order)


def test_positioned_reads_merged_buckets_of_an_image_folder_one_shape_per_global_batch(tmp_path):
    from vis2ir.data.order import Positioned

    cfg = folder_config(mixed_folder(tmp_path / "ts"))  # buckets of 3 (80×48), 6 (64×64), 3 (48×80)
    data = build_dataset(cfg.data, "train")
    pos = Positioned(data, seed=1, chunk=4)  # a global batch of 4: the buckets of 3 cannot fill one
    assert len(set(data.shapes)) == 1 and pos.shapes is None and pos.epoch_length == 12
    seen = Counter(pos[k]["name"] for k in range(12))
    assert len(seen) == 12  # one epoch reads every sample once, no repeats
    assert all(pos[k]["visible"].shape[1:] == (64, 64) for k in range(12))
