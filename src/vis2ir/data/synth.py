"""ThermalScenes as a dataset (rendered on demand, no files) and written to disk.

Scene `i` is named `scene_{i:06d}` and falls in the split that the hash of its name gives (the rule
for any data set without official splits), so the scenes of train, val and test are disjoint, and
a folder or parquet file written by `write_thermalscenes` reads back with the same splits and pixels.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vis2ir.config import DataConfig, check_seed
from vis2ir.data.errors import DataError
from vis2ir.data.images import PANEL_KINDS, rgb_tensor
from vis2ir.data.splits import hash_split
from vis2ir.data.tables import write_parquet
from vis2ir.data.thermalscenes import Scene, render_scene
from vis2ir.files import write_bytes
from vis2ir.io.images import PIXEL_LIMIT_ENV, pixel_limit

log = logging.getLogger(__name__)


def scene_name(index: int) -> str:
    return f"scene_{index:06d}"


class ThermalScenes(Dataset):
    """Scenes `indices` (default: 0 .. count-1) of the set `seed`, rendered at `size` when asked.

    Samples: `visible`, `infrared`, `semantic` (float `[3, H, W]` in [0, 1]; `semantic=False` leaves
    it out), `classes` (long `[H, W]`, palette ids) and `name`. `flip` mirrors half of them at random;
    `cache` keeps rendered scenes (uint8) in this process for later epochs.
    """

    def __init__(self, count: int, size: int | tuple[int, int] = 256, seed: int = 0, *,
                 indices: list[int] | None = None, flip: bool = False, semantic: bool = True,
                 cache: bool = False):
        self.size, self.seed, self.flip, self.semantic = size, seed, flip, semantic
        self.indices = list(range(count)) if indices is None else list(indices)
        self._cache: dict[int, Scene] | None = {} if cache else None

    @classmethod
    def split_of(cls, cfg: DataConfig, split: str, semantic: bool = True, empty_ok: bool = False) -> ThermalScenes:
        """The scenes of `split` among `cfg.synth_count` scenes of seed `cfg.synth_seed`, at `cfg.size`
        (none: `DataError`, or an empty set with `empty_ok`)."""
        indices = split_indices(cfg.synth_count, split, cfg.val_fraction, cfg.test_fraction)
        if not indices and not empty_ok:
            raise DataError(f"data.synth_count={cfg.synth_count}: too few scenes for a {split!r} split "
                            f"(val_fraction={cfg.val_fraction}, test_fraction={cfg.test_fraction})")
        return cls(cfg.synth_count, cfg.size, cfg.synth_seed, indices=indices,
                   flip=cfg.hflip and split == "train", semantic=semantic)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Each scene's panel (width, height): all alike."""
        h, w = (self.size, self.size) if isinstance(self.size, int) else self.size
        return [(w, h)] * len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        scene = self._cache.get(index) if self._cache is not None else None
        if scene is None:
            scene = render_scene(index, self.seed, self.size)
            if self._cache is not None:
                self._cache[index] = scene
        flip = self.flip and bool(torch.rand(()) < 0.5)
        kinds = ("visible", "infrared", "semantic") if self.semantic else ("visible", "infrared")
        panels = {k: getattr(scene, k) for k in (*kinds, "classes")}
        if flip:
            panels = {k: v[:, ::-1] for k, v in panels.items()}
        sample = {k: rgb_tensor(panels[k]) for k in kinds}
        sample["name"] = scene_name(index)
        sample["classes"] = torch.from_numpy(np.ascontiguousarray(panels["classes"]))
        return sample

    def prerender(self, processes: int = 1) -> ThermalScenes:
        """Render every scene now, in `processes` processes, and keep them (DataLoader workers forked
        afterwards share the cache instead of each rendering its own)."""
        from multiprocessing import get_context

        if self._cache is None:
            self._cache = {}
        todo = [i for i in self.indices if i not in self._cache]
        if processes > 1 and len(todo) > 64:
            pool = get_context("fork").Pool(processes)
            try:
                scenes = pool.starmap(render_scene, [(i, self.seed, self.size) for i in todo], chunksize=64)
            finally:  # close + join, not terminate: no SIGTERM into workers that inherited signal handlers
                pool.close()
                pool.join()
        else:
            scenes = [render_scene(i, self.seed, self.size) for i in todo]
        self._cache.update(zip(todo, scenes))
        return self


def split_indices(count: int, split: str, val_fraction: float, test_fraction: float) -> list[int]:
    """Indices of the scenes of `split` among `count` (by the hash of their names)."""
    return [i for i in range(count) if hash_split(scene_name(i), val_fraction, test_fraction) == split]


SHAPE = re.compile(r"(\d+)x(\d+)", re.ASCII | re.IGNORECASE)
MIN_SIDE, MAX_SIDE = 16, 16384  # a scene's sides in pixels (and at most the image reader's pixel limit)
SIDES = f"sides from {MIN_SIDE} to {MAX_SIDE} pixels"


def shape_problem(width: int, height: int) -> str | None:
    """Why a `width` × `height` scene cannot be written (and read back by the package's image reader), or None."""
    limit = pixel_limit()
    if min(width, height) < MIN_SIDE or max(width, height) > MAX_SIDE:
        return SIDES
    if limit and width * height > limit:
        return f"at most {limit} pixels (the image reader's limit, ${PIXEL_LIMIT_ENV})"
    return None


def parse_shapes(text: str, what: str = "--shapes") -> list[tuple[int, int]]:
    """`"640x512,512x640"` → `[(640, 512), (512, 640)]` (width × height, ASCII digits, sides as `shape_problem`
    allows); bad text is a one-line `DataError`."""
    shapes = []
    for part in text.split(","):
        m = SHAPE.fullmatch(part.strip())
        problem = SIDES if m is None else shape_problem(int(m[1]), int(m[2]))
        if problem is not None:
            raise DataError(f"{what} {text!r}: expected WIDTHxHEIGHT[,WIDTHxHEIGHT...] with "
                            f"{problem}, e.g. 640x512,512x640 (got {part.strip()!r})")
        shapes.append((int(m[1]), int(m[2])))
    return shapes


def write_thermalscenes(out: str | Path, count: int, size: int = 256, seed: int = 0,
                        fmt: str = "folder", shapes: list[tuple[int, int]] | None = None) -> Path:
    """Render `count` scenes into `out`: `visible/ infrared/ semantic/` PNGs (`folder`) or one
    `thermalscenes.parquet` (`parquet`, columns name, visible, infrared, panoptic_img). Scenes are
    `size` × `size`, or with `shapes` (width, height) scene i takes `shapes[i % len(shapes)]` (a mix of
    aspect ratios). Returns what `data.source` should name to read them back."""
    shapes = shapes or [(size, size)]
    if count < 1:
        raise DataError(f"synth: expected --count >= 1, got {count}")
    for w, h in shapes:
        problem = shape_problem(w, h)
        if problem is not None:
            raise DataError(f"synth: expected scenes with {problem}, got {w}x{h}")
    check_seed(seed, "--seed")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    scenes = (render_scene(i, seed, shapes[i % len(shapes)][::-1]) for i in range(count))
    bar = tqdm(scenes, total=count, desc=f"ThermalScenes -> {out}", unit="scene")
    if fmt == "folder":
        for i, scene in enumerate(bar):
            for kind in ("visible", "infrared", "semantic"):
                write_bytes(out / kind / f"{scene_name(i)}.png", _png(getattr(scene, kind)))
        target = out
    elif fmt == "parquet":
        target = out / "thermalscenes.parquet"
        write_parquet(target, ({"name": scene_name(i), **{k: _png(getattr(scene, k)) for k in PANEL_KINDS}}
                               for i, scene in enumerate(bar)))
    else:
        raise DataError(f"synth: unknown format {fmt!r} (expected folder or parquet)")
    log.info("wrote %d ThermalScenes at %s (seed %d) to %s", count, ", ".join(f"{w}x{h}" for w, h in shapes),
             seed, target)
    return target


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()
