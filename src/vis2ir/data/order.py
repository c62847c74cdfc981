"""The training data order that survives a resume: endless sample positions, each a pure function of (seed, k).

`StepSampler` yields positions k (every `world`-th for a DDP rank), `Positioned` reads position k as a sample
of a seeded shuffle of epoch k // n. With aspect-ratio buckets, each global batch holds one shape
(`data.buckets.epoch_order`), small buckets merged first so that they reweight nothing (`buckets.merge_small`).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch.utils.data import Dataset, Sampler

from vis2ir.data import buckets

log = logging.getLogger(__name__)


class StepSampler(Sampler[int]):
    """Endless sample positions k = start, start+1, … (every `world`-th one for DDP rank `rank`)."""

    def __init__(self, start: int = 0, rank: int = 0, world: int = 1):
        self.start, self.rank, self.world = start, rank, world

    def __iter__(self):
        k = self.start * self.world + self.rank
        while True:
            yield k
            k += self.world

    def __len__(self) -> int:
        return 2**62


class Positioned(Dataset):
    """Reads sample position k as: epoch k // n, a seeded shuffle of that epoch, and a seeded RNG.

    Everything random about position k (which sample, its flip or crop) is a pure function of
    (seed, k), so a resumed run sees exactly what an uninterrupted one would have. A dataset whose
    samples have several `shapes` (aspect-ratio buckets) is read in runs of `chunk` positions (one
    global batch: batch size × ranks) of one shape (`data.buckets.epoch_order`), so every batch of
    every rank at a step has the same shape. Buckets too small for that are merged into the nearest
    shape (`buckets.merge_small`) where the dataset can change a sample's shape (`use_shapes`); a
    dataset that cannot (a latent cache) is read as it is, with a warning when its buckets repeat much.
    """

    def __init__(self, dataset: Dataset, seed: int, chunk: int = 1):
        self.dataset, self.seed, self.chunk, self._perm = dataset, seed, chunk, (None, None)
        shapes = getattr(dataset, "shapes", None)
        if shapes is not None and len(set(shapes)) > 1:
            shapes = self._merged(list(shapes), chunk)
        self.shapes = shapes if shapes is not None and len(set(shapes)) > 1 else None
        self.epoch_length = len(dataset) if self.shapes is None else buckets.epoch_length(self.shapes, chunk)

    def _merged(self, shapes: list, chunk: int) -> list:
        merged = buckets.merge_small(shapes, chunk)
        if merged == shapes:
            return shapes
        moved = sum(a != b for a, b in zip(shapes, merged))
        if hasattr(self.dataset, "use_shapes"):
            self.dataset.use_shapes(merged)
            log.info("aspect-ratio buckets: %d samples of %d buckets smaller than needed for whole global batches "
                     "of %d are read at the nearest larger bucket's shape (%d shapes left)", moved,
                     len(set(shapes)) - len(set(merged)), chunk, len(set(merged)))
            return merged
        pad = buckets.padding(shapes, chunk)
        small = sorted(n for n in Counter(shapes).values() if n < chunk)
        log.warning("%s: its aspect-ratio buckets fill their last global batches (of %d) with repeats: %d of %d "
                    "positions an epoch%s; its shapes are fixed (train from the images, which merges small buckets, or "
                    "make the cache with data.resize_policy=center_crop: one shape)",
                    getattr(self.dataset, "path", "the training data"), chunk, pad, len(shapes) + pad,
                    f", {len(small)} buckets smaller than one global batch" if small else "")
        return shapes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int):
        epoch, i = divmod(k, self.epoch_length)
        if self._perm[0] != epoch:
            if self.shapes is None:
                g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
                self._perm = (epoch, torch.randperm(len(self.dataset), generator=g))
            else:
                self._perm = (epoch, buckets.epoch_order(self.shapes, self.chunk, self.seed * 100003 + epoch))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1000003 + k)
            return self.dataset[int(self._perm[1][i])]
