"""Semantic maps that are mostly unlabelled: found by `data inspect`, warned about by train, generate, evaluate.

A pixel is unlabelled when its colour decodes to `palette.VOID` (black, white or an unassigned colour). Maps
drawn from detection boxes leave most of a photo VOID (MSRS' YOLO boxes: 92 % of the pixels); a model
conditioned on such maps sees nearly the same empty map for every photo, and the shipped models then paint
one template whatever the photo. Such maps are not an error (a map may be honestly empty), but a problem
that `data inspect` names and every command that uses maps warns about.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from vis2ir.data.errors import DataError
from vis2ir.palette import VOID, decode, decode_classes

log = logging.getLogger(__name__)

# A map with more than this share of VOID pixels is "mostly unlabelled": box-drawn maps are 85-95 % VOID,
# segmenter maps (`vis2ir segment`) and ThermalScenes 0 %; real photos with much sky or road stay far below.
VOID_LIMIT = 0.80
CHECKS = 64  # maps decoded (every n-th sample) to judge a data set; cheap at a few ms each
THUMB = 64  # the side they are decoded at: enough to measure a share of pixels
WAYS_OUT = ("make full maps with `vis2ir segment` (or data.semantic_source=auto / --semantic auto), train with "
            "train.semantic_dropout > 0 (the model learns to read partial and missing maps), or use a model without "
            "semantic maps (model.semantic.mode=none)")

_warned: set[str] = set()


def void_share(semantic) -> float:
    """The share of pixels of a semantic map that decode to `VOID`: a float `[3, H, W]` tensor in [0, 1] (as
    the datasets give them) or uint8 RGB `[H, W, 3]` (a decoded image file)."""
    if isinstance(semantic, torch.Tensor):
        classes = decode_classes(semantic).numpy()
    else:
        classes = decode(np.asarray(semantic)[..., :3])[0]
    return float((classes == VOID).mean()) if classes.size else 0.0


def mostly_void_problem(shares: dict[str, float], checked: int, where: str) -> str | None:
    """One line naming the maps (of `checked`, by name → VOID share) over `VOID_LIMIT`, or None."""
    bad = {name: share for name, share in shares.items() if share > VOID_LIMIT}
    if not bad:
        return None
    name, share = max(bad.items(), key=lambda item: item[1])
    return (f"{where}: {len(bad)} of {checked} semantic maps checked are mostly unlabelled (more than "
            f"{VOID_LIMIT:.0%} VOID: black or unassigned colours, as maps drawn from boxes are), e.g. {name}: "
            f"{share:.0%}; a model conditioned on them sees nearly the same map for every photo and paints one "
            f"template; {WAYS_OUT}")


def shares_of(load, count: int, where: str) -> str | None:
    """The `mostly_void_problem` of the samples `load(0) … load(count - 1)` (each a dict with "name" and
    "semantic", as `PanelDataset.load` gives them), or None. A sample that cannot be read (`DataError`) is left
    to the dataset's own checks."""
    shares: dict[str, float] = {}
    for i in range(count):
        try:
            sample = load(i)
        except DataError:
            continue
        shares[str(sample["name"])] = void_share(sample["semantic"])
    return mostly_void_problem(shares, len(shares), where) if shares else None


def warn_mostly_void(label: str, semantic) -> None:
    """Warn once per process when the map `label` (as `void_share` takes it) is mostly unlabelled."""
    if "given" in _warned:
        return  # warned once already: no map is decoded for it again (generate and evaluate call this per image)
    share = void_share(semantic)
    if share > VOID_LIMIT:
        _warned.add("given")
        log.warning("%s: %.0f%% of this semantic map is unlabelled (VOID: black or unassigned colours; more than "
                    "%.0f%%, as maps drawn from boxes are): the model sees nearly an empty map and paints a template "
                    "rather than this photo; %s (further such maps are not named)", label, 100 * share,
                    100 * VOID_LIMIT, WAYS_OUT)
