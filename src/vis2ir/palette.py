"""The semantic palette: one fixed colour per class, instances shaded apart, and colour -> class.

Class ids 0-132 are COCO panoptic's, in the order panoptic segmenters report them (Mask2Former's
`id2label`); ids from 133 on are classes COCO lacks: 133 `statue` and 134 `car-running` (the synthetic
ThermalScenes need them) and 135 `background`, the declared background of maps drawn from detection
boxes (`vis2ir.io.boxes`: "no annotated object here", unlike `VOID`, black, "unknown"). Every base
colour sits on a lattice of six levels per channel (21, 63, ..., 231; one cell of 42 values per level),
each class owning one cell. Instance k of a class is its base colour plus `INSTANCE_SHADES[k % 27]`,
an offset of -14, 0 or +14 per channel that stays inside the class's cell, so shades never collide
with another class and decoding is a rounding, robust to about +-7 of noise (e.g. JPEG). The cells of
black and white are left unassigned: such pixels, like any other unassigned cell, decode to `VOID`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch only for `decode_classes`: the palette (and vis2ir.io.boxes) import without it
    import torch

LEVELS = (21, 63, 105, 147, 189, 231)
CELL = 42
SHADE_STEP = 14
VOID = -1

# (name, base colour); the index in this table is the class id.
PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("person", (231, 21, 63)), ("bicycle", (21, 231, 63)), ("car", (21, 21, 147)),
    ("motorcycle", (231, 21, 231)), ("airplane", (105, 21, 231)), ("bus", (21, 231, 231)),
    ("train", (63, 147, 105)), ("truck", (147, 105, 231)), ("boat", (147, 231, 21)),
    ("traffic light", (231, 105, 105)), ("fire hydrant", (21, 21, 231)), ("stop sign", (21, 147, 21)),
    ("parking meter", (21, 231, 147)), ("bench", (105, 231, 231)), ("bird", (231, 21, 147)),
    ("cat", (231, 105, 189)), ("dog", (147, 63, 21)), ("horse", (105, 21, 21)),
    ("sheep", (231, 231, 21)), ("cow", (105, 21, 105)), ("elephant", (147, 147, 147)),
    ("bear", (21, 105, 63)), ("zebra", (21, 189, 105)), ("giraffe", (63, 21, 189)),
    ("backpack", (63, 63, 147)), ("umbrella", (63, 63, 231)), ("handbag", (63, 105, 21)),
    ("tie", (63, 189, 21)), ("suitcase", (63, 189, 147)), ("frisbee", (63, 231, 105)),
    ("skis", (63, 231, 189)), ("snowboard", (105, 63, 189)), ("sports ball", (105, 105, 63)),
    ("kite", (105, 105, 147)), ("baseball bat", (105, 147, 189)), ("baseball glove", (105, 189, 63)),
    ("skateboard", (147, 21, 63)), ("surfboard", (147, 21, 189)), ("tennis racket", (147, 105, 105)),
    ("bottle", (147, 147, 63)), ("wine glass", (147, 189, 231)), ("cup", (189, 21, 21)),
    ("fork", (189, 21, 105)), ("knife", (189, 63, 63)), ("spoon", (189, 63, 189)),
    ("bowl", (189, 105, 21)), ("banana", (189, 105, 147)), ("apple", (189, 147, 231)),
    ("sandwich", (189, 189, 21)), ("orange", (189, 231, 63)), ("broccoli", (231, 63, 21)),
    ("carrot", (231, 147, 147)), ("hot dog", (231, 189, 63)), ("pizza", (21, 21, 63)),
    ("donut", (21, 21, 105)), ("cake", (21, 21, 189)), ("chair", (21, 63, 21)),
    ("couch", (21, 63, 63)), ("potted plant", (21, 63, 147)), ("bed", (21, 63, 189)),
    ("dining table", (21, 63, 231)), ("toilet", (21, 105, 21)), ("tv", (21, 105, 105)),
    ("laptop", (21, 105, 147)), ("mouse", (21, 105, 231)), ("remote", (21, 147, 63)),
    ("keyboard", (21, 147, 105)), ("cell phone", (21, 147, 147)), ("microwave", (21, 147, 231)),
    ("oven", (21, 189, 21)), ("toaster", (21, 189, 63)), ("sink", (21, 189, 147)),
    ("refrigerator", (21, 189, 189)), ("book", (21, 189, 231)), ("clock", (21, 231, 21)),
    ("vase", (21, 231, 105)), ("scissors", (21, 231, 189)), ("teddy bear", (63, 21, 21)),
    ("hair drier", (63, 21, 63)), ("toothbrush", (63, 21, 105)), ("banner", (63, 21, 147)),
    ("blanket", (63, 21, 231)), ("bridge", (63, 63, 21)), ("cardboard", (63, 63, 105)),
    ("counter", (63, 63, 189)), ("curtain", (63, 105, 63)), ("door-stuff", (63, 105, 105)),
    ("floor-wood", (63, 105, 147)), ("flower", (63, 105, 189)), ("fruit", (63, 105, 231)),
    ("gravel", (63, 147, 21)), ("house", (63, 147, 63)), ("light", (231, 231, 105)),
    ("mirror-stuff", (63, 147, 147)), ("net", (63, 147, 189)), ("pillow", (63, 189, 63)),
    ("platform", (63, 189, 105)), ("playingfield", (63, 189, 189)), ("railroad", (63, 189, 231)),
    ("river", (21, 147, 189)), ("road", (147, 63, 147)), ("roof", (63, 231, 21)),
    ("sand", (63, 231, 63)), ("sea", (21, 63, 105)), ("shelf", (63, 231, 147)),
    ("snow", (63, 231, 231)), ("stairs", (105, 21, 63)), ("tent", (105, 21, 147)),
    ("towel", (105, 21, 189)), ("wall-brick", (105, 63, 21)), ("wall-stone", (105, 63, 63)),
    ("wall-tile", (105, 63, 105)), ("wall-wood", (105, 63, 147)), ("water-other", (21, 105, 189)),
    ("window-blind", (105, 63, 231)), ("window-other", (105, 105, 21)), ("tree-merged", (105, 147, 21)),
    ("fence-merged", (105, 105, 105)), ("ceiling-merged", (105, 105, 189)), ("sky-other-merged", (63, 147, 231)),
    ("cabinet-merged", (105, 105, 231)), ("table-merged", (105, 147, 63)), ("floor-other-merged", (105, 147, 105)),
    ("pavement-merged", (189, 189, 189)), ("mountain-merged", (105, 147, 147)), ("grass-merged", (147, 231, 147)),
    ("dirt-merged", (105, 147, 231)), ("paper-merged", (105, 189, 21)), ("food-other-merged", (105, 189, 105)),
    ("building-other-merged", (63, 63, 63)), ("rock-merged", (105, 189, 147)), ("wall-other-merged", (105, 189, 189)),
    ("rug-merged", (105, 189, 231)), ("statue", (189, 189, 105)), ("car-running", (231, 147, 21)),
    ("background", (147, 147, 105)),
)

CLASS_NAMES: tuple[str, ...] = tuple(name for name, _ in PALETTE)
NUM_COCO_CLASSES = 133
NUM_CLASSES = len(PALETTE)
CLASS_IDS: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}
BASE_COLOURS = np.array([colour for _, colour in PALETTE], dtype=np.int16)

# Instance shades: instance 0 is the base colour, then lighter, darker, then the other offsets.
_OFFSETS = [(r, g, b) for r in (0, 1, -1) for g in (0, 1, -1) for b in (0, 1, -1)]
_OFFSETS.sort(key=lambda o: (o != (0, 0, 0), o != (1, 1, 1), o != (-1, -1, -1)))
INSTANCE_SHADES = np.array(_OFFSETS, dtype=np.int16) * SHADE_STEP

# Every colour in use, row 1 + class * 27 + shade; row 0 is black for VOID.
_COLOURS = np.concatenate([np.zeros((1, 3), np.int16),
                           (BASE_COLOURS[:, None] + INSTANCE_SHADES[None]).reshape(-1, 3)]).astype(np.uint8)
_CELL_TO_CLASS = np.full(len(LEVELS) ** 3, VOID, dtype=np.int64)
_CELL_TO_CLASS[(BASE_COLOURS // CELL) @ np.array([36, 6, 1])] = np.arange(NUM_CLASSES)
_OFFSET_TO_SHADE = np.zeros(27, dtype=np.int64)
_OFFSET_TO_SHADE[(INSTANCE_SHADES // SHADE_STEP + 1) @ np.array([9, 3, 1])] = np.arange(27)


def class_id(name: str) -> int:
    """The id of a class by name (`KeyError` names the unknown class)."""
    return CLASS_IDS[name]


def colourise(classes: np.ndarray, instances: np.ndarray | None = None) -> np.ndarray:
    """Class ids `[..., H, W]` (and instance numbers) -> uint8 RGB `[..., H, W, 3]`; VOID is black."""
    classes = np.asarray(classes)
    shade = 0 if instances is None else np.asarray(instances) % len(INSTANCE_SHADES)
    return _COLOURS[np.where(classes >= 0, classes * len(INSTANCE_SHADES) + shade + 1, 0)]


def decode(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB `[..., 3]` -> (class ids, instance shade indices), both int64 `[...]`.

    Colours in an unassigned cell decode to class `VOID`. The shade index identifies instances
    within one map up to 27 instances of a class.
    """
    rgb = np.asarray(rgb).astype(np.int16)
    cell = np.minimum(rgb // CELL, len(LEVELS) - 1)
    classes = _CELL_TO_CLASS[cell @ np.array([36, 6, 1], dtype=np.int16)]
    offset = np.clip(np.rint((rgb - (cell * CELL + CELL // 2)) / SHADE_STEP), -1, 1).astype(np.int16)
    shades = _OFFSET_TO_SHADE[(offset + 1) @ np.array([9, 3, 1], dtype=np.int16)]
    return classes, shades


def decode_classes(semantic: torch.Tensor) -> torch.Tensor:
    """A semantic panel (float `[..., 3, H, W]` in [0, 1]) -> class ids (long `[..., H, W]`)."""
    import torch

    rgb = (semantic.detach().clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()
    return torch.from_numpy(decode(rgb)[0])


FAR = 3  # a pixel farther than this (per channel) from every palette colour is not a palette colour (JPEG: ~0-2)
MOSTLY_FAR = 0.5  # a map with this fraction of such pixels is not coloured with the palette
REMEDY = ("make maps with `vis2ir segment`, draw them from detection boxes (data.semantic_source=boxes, generate "
          "--boxes), or colour class ids with vis2ir.palette.colourise (docs/data.md, \"Maps without the Hub\")")


def semantic_problem(rgb: np.ndarray | None, mode: str | None = None) -> str | None:
    """Why a semantic map cannot be used, or None. `mode`: the file's PIL mode (one channel: class
    ids, not colours); `rgb`: uint8 `[H, W, 3]` pixels, refused when grey and not palette greys, or
    when mostly far from every palette colour (a map from another tool or palette)."""
    if mode is not None and mode not in ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr"):
        return f"the semantic map has one channel (mode {mode}: class ids?), not palette colours; {REMEDY}"
    if rgb is None or rgb.size == 0:
        return None
    rgb = np.asarray(rgb)[..., :3].astype(np.int16)
    classes, shades = decode(rgb)
    nearest = _COLOURS[np.where(classes >= 0, classes * len(INSTANCE_SHADES) + shades + 1, 0)].astype(np.int16)
    distance = np.abs(rgb - nearest).max(-1)
    grey = bool((np.abs(rgb - rgb[..., :1]).max() <= 2))
    if grey and (distance > 0).mean() > 0.1:
        return f"the semantic map is grey (class ids?), not palette colours; {REMEDY}"
    far = float((distance > FAR).mean())
    if far >= MOSTLY_FAR:
        return f"{far:.0%} of the semantic map's pixels are far from every palette colour; {REMEDY}"
    return None


# ----------------------------------------------------------------------------------------------
# Things and stuff, model label names, the legend

# Countable classes (instances shaded apart): COCO's 80 things and the ThermalScenes extras
# (`background`, the declared background of box maps, is stuff).
THING_IDS = frozenset(range(80)) | {CLASS_IDS["statue"], CLASS_IDS["car-running"]}
# Other data sets' names for palette classes (Cityscapes, Pascal VOC, ADE20K spellings; the RGB-T
# detection sets' categories: KAIST, FLIR ADAS, LLVIP, M3FD).
ALIASES = {
    "vegetation": "tree-merged", "terrain": "grass-merged", "sidewalk": "pavement-merged", "rider": "person",
    "motorbike": "motorcycle", "bike": "bicycle", "aeroplane": "airplane", "sofa": "couch", "tvmonitor": "tv",
    "tv monitor": "tv", "television": "tv", "diningtable": "dining table", "pottedplant": "potted plant",
    "plant": "potted plant", "ground": "dirt-merged", "earth": "dirt-merged", "field": "playingfield",
    "windowpane": "window-other", "lamp": "light", "street light": "light", "streetlight": "light",
    "people": "person", "pedestrian": "person", "cyclist": "person", "motor": "motorcycle",
    "hydrant": "fire hydrant",
}


def _plain(name: str) -> str:
    """A label name without case, underscores, a trailing '?' (KAIST's `person?`) and COCO's `-merged` /
    `-other` / `-stuff` suffixes."""
    name = name.strip().lower().replace("_", " ").rstrip("?").strip()
    for suffix in ("-merged", "-other", "-stuff"):
        name = name.removesuffix(suffix)
    return name


_PLAIN_IDS: dict[str, int] = {_plain(name): i for i, name in reversed(list(enumerate(CLASS_NAMES)))}


def class_for_label(label: str) -> int:
    """The palette class of a model's label name (`config.id2label`) or a data set's category name,
    else `VOID`.

    Tried in order: the exact name; then each comma-separated synonym (ADE20K style) without case,
    a trailing '?' and COCO suffixes (`sky` finds `sky-other-merged`); then `ALIASES` (`people`).
    """
    if label in CLASS_IDS:
        return CLASS_IDS[label]
    for part in label.split(","):
        plain = _plain(part)
        if plain in _PLAIN_IDS:
            return _PLAIN_IDS[plain]
        if plain in ALIASES:
            return CLASS_IDS[ALIASES[plain]]
    return VOID


def legend_entries(ids=None) -> list[dict]:
    """Class id, name, base colour (RGB and hex) and thing/stuff for `ids` (default: every class)."""
    ids = range(NUM_CLASSES) if ids is None else sorted(set(ids))
    return [{"id": int(i), "name": CLASS_NAMES[i], "rgb": [int(v) for v in BASE_COLOURS[i]],
             "hex": "#{:02x}{:02x}{:02x}".format(*(int(v) for v in BASE_COLOURS[i])),
             "thing": i in THING_IDS} for i in ids]
