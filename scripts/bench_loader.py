"""Loader throughput: triptychs/s from 1280x1024 JPEG pairs (the LLVIP layout) to 512x512 panels.

    PYTHONPATH=src python scripts/bench_loader.py --workers 0 1 2 [--semantic] [--policy center_crop]

Writes `--count` ThermalScenes rendered at 1280x1024 as visible JPEG + infrared JPEG (3-channel
grey, as LLVIP stores it), and with `--semantic` a PNG semantic map each, into a temporary folder,
then times `--epochs` epochs of `make_loader` after one warm-up epoch. Not a test: figures go in
docs/data.md with the machine they came from.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vis2ir.config import DataConfig
from vis2ir.data import build_dataset, make_loader, render_scene

log = logging.getLogger("bench_loader")


def write_llvip(root: Path, count: int, semantic: bool) -> None:
    for i in range(count):
        scene = render_scene(i, seed=0, size=(1024, 1280))
        for kind, image in (("visible", scene.visible), ("infrared", np.stack([scene.infrared] * 3, -1))):
            (root / kind / "train").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / kind / "train" / f"{i:06d}.jpg", quality=90)
        if semantic:
            (root / "semantic" / "train").mkdir(parents=True, exist_ok=True)
            Image.fromarray(scene.semantic).save(root / "semantic" / "train" / f"{i:06d}.png")


def measure(cfg: DataConfig, workers: int, epochs: int, batch_size: int, semantic: bool) -> float:
    ds = build_dataset(cfg, "train", require_semantic=semantic or None)
    loader = make_loader(ds, batch_size=batch_size, shuffle=True, num_workers=workers)
    for _ in loader:  # warm-up: start the workers, fill the page cache
        pass
    start, n = time.perf_counter(), 0
    for _ in range(epochs):
        for batch in loader:
            n += len(batch["name"])
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--count", type=int, default=32, help="image pairs to generate (default 32)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--policy", default="center_crop", choices=("resize", "center_crop", "random_crop"))
    parser.add_argument("--semantic", action="store_true", help="also load a 1280x1024 PNG semantic map each")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        log.info("writing %d pairs of 1280x1024 JPEGs%s ...", args.count, " + PNG maps" if args.semantic else "")
        write_llvip(root, args.count, args.semantic)
        cfg = DataConfig(source=str(root), size=args.size, resize_policy=args.policy, val_fraction=0.0)
        log.info("%d CPU cores; %s to %dx%d panels, batch %d", os.cpu_count(), args.policy, args.size,
                 args.size, args.batch_size)
        for workers in args.workers:
            rate = measure(cfg, workers, args.epochs, args.batch_size, args.semantic)
            log.info("workers %d: %.1f triptychs/s (%.1f per worker)", workers, rate, rate / max(workers, 1))


if __name__ == "__main__":
    main()
