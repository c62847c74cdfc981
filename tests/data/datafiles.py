"""Small generated files in the layouts the data package reads (shared by the data tests)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vis2ir.data.thermalscenes import Scene, render_scene


@cache
def scene(k: int, size: int = 64) -> Scene:
    """Distinct, realistic content for sample `k` (a ThermalScenes scene, seed 5)."""
    return render_scene(k, seed=5, size=size)


def save(path: Path, array: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


def write_pair(vis: Path, ir: Path, k: int, sem: Path | None = None, size: int = 64) -> None:
    """Sample `k` as a visible file, a grey infrared file and optionally a semantic map."""
    s = scene(k, size)
    save(vis, s.visible, quality=95) if vis.suffix == ".jpg" else save(vis, s.visible)
    save(ir, s.infrared, quality=95) if ir.suffix in (".jpg", ".jpeg") else save(ir, s.infrared)
    if sem is not None:
        save(sem, s.semantic)


def expected(k: int, size: int = 64) -> dict[str, torch.Tensor]:
    """The tensors a sample of scene `k` should hold when no resizing happens."""
    s = scene(k, size)
    rgb = lambda a: torch.from_numpy(a).permute(2, 0, 1).float() / 255  # noqa: E731
    return {"visible": rgb(s.visible), "infrared": torch.from_numpy(s.infrared).float().expand(3, -1, -1) / 255,
            "semantic": rgb(s.semantic), "classes": torch.from_numpy(s.classes)}


def assert_sample(sample: dict, k: int, tol: float = 0.0, size: int = 64) -> None:
    """`sample` holds scene `k` (exactly, or within mean absolute error `tol` for JPEG)."""
    want = expected(k, size)
    for key in ("visible", "infrared", "semantic"):
        if key in sample:
            err = (sample[key] - want[key]).abs().mean().item()
            assert err <= tol + 1e-7, f"{sample['name']} {key}: mean abs error {err:.4f} > {tol}"
