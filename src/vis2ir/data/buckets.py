"""Aspect-ratio buckets: panels at (about) their own aspect ratio, one shape per batch.

With `data.resize_policy: bucket` a sample is not cropped to a square: its panels are resized to the
nearest (in log aspect ratio) of a fixed list of shapes of about `data.size`² pixels, each side a
multiple of `MULTIPLE` (the codec's patch: FLUX's VAE 8 × the 2×2 token packing), long/short at most
`data.max_aspect`. Training batches hold one bucket each, and every DDP rank is in the same bucket at
each step: `epoch_order` makes the order of an epoch a pure function of (seed, epoch), in runs of one
global batch (batch × ranks) per bucket, so `data.order.Positioned` keeps a resumed run exact.

A bucket's last run is filled up with repeats of its own samples; so that buckets reweight nothing, a
bucket smaller than a global batch, or buckets whose fill-up would make more than `REPEAT_SHARE` of an
epoch repeats, are merged into the nearest shape first (`merge_small`): no sample is then read more
than twice an epoch, and repeats are at most `REPEAT_SHARE` of an epoch of 20 global batches or more
(of a smaller data set, at most one global batch).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

MULTIPLE = 16  # every side of a bucket is a multiple of this (the patch of the VAE codec and of pixel_factor ≤ 8)
MIN_AREA = 0.9  # a bucket holds between this share of size² and size² pixels
# At most this share of an epoch may be repeats filling up the buckets' last global batches: more and some
# photos weigh visibly more than others (2000 mixed photos, 8 GPUs × 4: 47 % repeats before merging).
REPEAT_SHARE = 0.10

Shape = tuple[int, int]  # (width, height) of a panel, in pixels


def bucket_shapes(size: int, max_aspect: float, multiple: int = MULTIPLE) -> list[Shape]:
    """Every (width, height), both multiples of `multiple`, with `MIN_AREA`·size² ≤ width·height ≤ size²
    and long/short ≤ `max_aspect`; sorted by aspect (width/height), the square `(size, size)` included."""
    area = size * size
    shapes = []
    for w in range(multiple, size * math.ceil(math.sqrt(max_aspect)) + multiple, multiple):
        for h in range(multiple * max(1, math.ceil(MIN_AREA * area / w / multiple)), area // w + 1, multiple):
            if MIN_AREA * area <= w * h <= area and max(w, h) <= max_aspect * min(w, h):
                shapes.append((w, h))
    return sorted(shapes, key=lambda s: (s[0] / s[1], s[0] * s[1]))


def nearest_bucket(width: int, height: int, shapes: list[Shape]) -> Shape:
    """The bucket for an image of `width × height` (upright): the nearest aspect ratio (in log), and of
    equally near ones the largest."""
    aspect = math.log(width / height)
    return min(shapes, key=lambda s: (round(abs(math.log(s[0] / s[1]) - aspect), 9), -s[0] * s[1]))


def assign(sizes: list[Shape], size: int, max_aspect: float) -> list[Shape]:
    """The bucket of each image size (width, height; upright) in `sizes`."""
    shapes = bucket_shapes(size, max_aspect)
    memo: dict[Shape, Shape] = {}
    return [memo.setdefault(s, nearest_bucket(*s, shapes)) if s not in memo else memo[s] for s in sizes]


def group(shapes: list[Shape]) -> dict[Shape, list[int]]:
    """Sample indices by shape, in index order; shapes in order of first appearance."""
    groups: dict[Shape, list[int]] = defaultdict(list)
    for i, s in enumerate(shapes):
        groups[s].append(i)
    return dict(groups)


def epoch_length(shapes: list[Shape], chunk: int) -> int:
    """Length of `epoch_order`'s epoch: each shape's count rounded up to a multiple of `chunk`, summed."""
    return sum(math.ceil(len(idx) / chunk) * chunk for idx in group(shapes).values())


def epoch_order(shapes: list[Shape], chunk: int, seed: int) -> torch.Tensor:
    """One epoch's sample indices, in runs of `chunk` (a global batch: batch size × ranks) of one shape.

    Each shape's indices are shuffled (generator seeded with `seed`) and cut into runs; a shape's last
    run is filled up with the first indices of its own shuffled list (padding: every sample is seen
    every epoch, a few twice), and the runs are shuffled. Length: `epoch_length(shapes, chunk)`."""
    g = torch.Generator().manual_seed(seed)
    runs, groups = [], group(shapes)
    for shape in sorted(groups):  # sorted: the order must not depend on which sample came first
        idx = torch.tensor(groups[shape])
        idx = idx[torch.randperm(len(idx), generator=g)]
        padded = idx.repeat(math.ceil(chunk / len(idx)) + 1)[:math.ceil(len(idx) / chunk) * chunk]
        runs += list(padded.view(-1, chunk))
    order = torch.randperm(len(runs), generator=g)
    return torch.cat([runs[int(r)] for r in order])


def padding(shapes: list[Shape], chunk: int) -> int:
    """How many positions of `epoch_order`'s epoch are repeats (each shape filled up to whole runs)."""
    return epoch_length(shapes, chunk) - len(shapes)


def merge_small(shapes: list[Shape], chunk: int, repeat_share: float = REPEAT_SHARE) -> list[Shape]:
    """`shapes` with small buckets merged into the nearest (in log aspect) remaining one, until every bucket
    holds at least `chunk` samples (a global batch: then no sample is read more than twice an epoch) and
    the fill-up repeats are at most `repeat_share` of an epoch, or one global batch where that is more (a data
    set of fewer than 2 / `repeat_share` global batches), or one bucket is left (no fill-up at all).

    The smallest bucket goes first (ties: the shape sorted first), so the fewest samples change shape. A
    pure function of `shapes` and `chunk`: every rank and every resume merges alike."""
    counts = {s: 0 for s in sorted(set(shapes))}
    for s in shapes:
        counts[s] += 1
    into: dict[Shape, Shape] = {s: s for s in counts}

    def bad() -> bool:
        pad = sum(-n % chunk for n in counts.values())
        allowed = max(repeat_share * (len(shapes) + pad), chunk)  # a small set: one global batch of repeats
        return len(counts) > 1 and (min(counts.values()) < chunk or pad > allowed)

    while bad():
        small = min(counts, key=lambda s: (counts[s], s))
        aspect = math.log(small[0] / small[1])
        near = min((s for s in counts if s != small),
                   key=lambda s: (round(abs(math.log(s[0] / s[1]) - aspect), 9), -counts[s], s))
        counts[near] += counts.pop(small)
        for s, target in into.items():
            if target == small:
                into[s] = near
    return [into[s] for s in shapes]
