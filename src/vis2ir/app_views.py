"""What `vis2ir app`'s page shows besides the model's output: the example scenes as thumbnails to click (photo
and map), small images drawn large, and the note on attention maps (how to see them, or which model has them).

Numpy and files only (no Gradio): `vis2ir.app` wires these into the page.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vis2ir.io.images import write_png
from vis2ir.visualize import MIN_PICTURE_SIDE

EXAMPLES = 4  # held-out ThermalScenes offered as examples


def example_scenes(folder: Path, pipe, count: int = EXAMPLES) -> list[list[str]]:
    """`count` held-out ThermalScenes (the test split of the demo data, at the model's panel size) as
    `[photo, semantic map]` PNG paths in `folder`."""
    from vis2ir.data.synth import scene_name, split_indices
    from vis2ir.data.thermalscenes import render_scene

    data = pipe.cfg.data
    rows = []
    for index in split_indices(data.synth_count, "test", data.val_fraction, data.test_fraction)[:count]:
        scene = render_scene(index, data.synth_seed, data.size)
        paths = [write_png(folder / kind / f"{scene_name(index)}.png", getattr(scene, kind))
                 for kind in ("visible", "semantic")]
        rows.append([str(p) for p in paths])
    return rows


def example_thumbnails(examples: list[list[str]], folder: Path) -> list[tuple[str, str]]:
    """What the page's example gallery shows, written into `folder`: per `[photo, map]` of `example_scenes`
    two items, the photo and then its map, each enlarged by whole pixels (`shown`: not blurred by the
    browser), as `(PNG path, caption)`; the caption, short enough to fit under a thumbnail, numbers the
    scene and says which one it is ('2: map'). Item `i` belongs to example `i // 2`."""
    from PIL import Image

    items = []
    for k, (photo, semantic) in enumerate(examples, 1):
        name = Path(photo).stem
        for kind, path in (("photo", photo), ("map", semantic)):
            image = shown(np.asarray(Image.open(path).convert("RGB")))
            items.append((str(write_png(folder / f"{name}_{kind}.png", image)), f"{k}: {kind}"))
    return items


def shown(image: np.ndarray) -> np.ndarray:
    """A small image drawn at least `MIN_PICTURE_SIDE` pixels on its longer side (pixels not smoothed)."""
    h, w = image.shape[:2]
    scale = max(1, -(-MIN_PICTURE_SIDE // max(h, w)))
    return image if scale == 1 else image.repeat(scale, 0).repeat(scale, 1)


def attention_note(mode: str, has_adapter: bool) -> str:
    """What the page says under a result about attention maps: how to see them, or why there are none and
    which model has them."""
    if has_adapter:
        return "Click a point on the photo below to see where the adapter attends from there."
    return (f"This model (mode {mode}) has no attention adapter: no attention maps. A cross-attention model has "
            "them (mode cross_attention, e.g. the shipped demo_cross_attention).")
