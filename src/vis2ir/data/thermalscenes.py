"""ThermalScenes: procedural, seeded visible/infrared/semantic scenes at any resolution (docs/design.md §7).

A scene is painted back to front into per-pixel maps of class, instance, albedo, temperature and
emissivity; the visible panel is albedo under day, dusk or night light with texture and noise, the
infrared panel the emitted intensity (temperature and emissivity, cold sky reflected) with a heat
halo, optics blur, sensor noise and sometimes vignetting. Semantics are *necessary*: persons and
statues wear the same clothes, running and parked cars look the same, some persons wear
camouflage, and at night the visible panel is nearly black, so the visible pixel alone cannot tell
hot from cold.

Scene `i` of seed `s` depends only on `(s, i)`; everything is numpy on the pixels each shape covers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from vis2ir.palette import CLASS_IDS, colourise

T_LOW, T_HIGH = -10.0, 40.0  # temperatures (°C) mapped to infrared 0 and 1
_C = CLASS_IDS
SKY, ROAD, GRASS, WATER, PAVEMENT = (_C[n] for n in ("sky-other-merged", "road", "grass-merged",
                                                     "water-other", "pavement-merged"))
BUILDING, TREE, PERSON, STATUE = _C["building-other-merged"], _C["tree-merged"], _C["person"], _C["statue"]
CAR, CAR_RUNNING, DOG, HORSE, LIGHT = _C["car"], _C["car-running"], _C["dog"], _C["horse"], _C["light"]
SCENE_CLASSES = (SKY, ROAD, GRASS, WATER, PAVEMENT, BUILDING, TREE, PERSON, STATUE, CAR, CAR_RUNNING,
                 DOG, HORSE, LIGHT)

_CLOTHES = np.array([[0.10, 0.10, 0.12], [0.85, 0.85, 0.82], [0.15, 0.22, 0.45], [0.55, 0.10, 0.10],
                     [0.30, 0.30, 0.32], [0.60, 0.55, 0.40], [0.20, 0.35, 0.20], [0.75, 0.60, 0.15],
                     [0.35, 0.20, 0.45], [0.12, 0.30, 0.55]])
_SKIN = np.array([[0.93, 0.78, 0.65], [0.80, 0.60, 0.45], [0.55, 0.38, 0.26], [0.35, 0.24, 0.17]])
_PAINT = np.array([[0.85, 0.85, 0.85], [0.08, 0.08, 0.09], [0.55, 0.05, 0.05], [0.12, 0.20, 0.45],
                   [0.50, 0.52, 0.55], [0.85, 0.75, 0.20], [0.15, 0.30, 0.18], [0.95, 0.95, 0.95]])
_FUR = np.array([[0.45, 0.30, 0.18], [0.10, 0.08, 0.07], [0.85, 0.82, 0.76], [0.60, 0.55, 0.50]])
_WALLS = np.array([[0.60, 0.30, 0.22], [0.62, 0.62, 0.60], [0.80, 0.74, 0.60], [0.40, 0.40, 0.42],
                   [0.70, 0.66, 0.58]])
_GLASS = np.array([0.12, 0.16, 0.22])


@dataclass
class Scene:
    """One rendered scene: uint8 panels and the class map."""

    visible: np.ndarray  # uint8 [H, W, 3]
    infrared: np.ndarray  # uint8 [H, W]
    semantic: np.ndarray  # uint8 [H, W, 3], palette colours
    classes: np.ndarray  # int64 [H, W], palette class ids


class _Canvas:
    """Per-pixel maps that shapes are painted into, back to front."""

    def __init__(self, h: int, w: int, rng: np.random.Generator):
        self.h, self.w, self.rng = h, w, rng
        self.cls = np.zeros((h, w), np.int64)
        self.inst = np.zeros((h, w), np.int64)
        self.albedo = np.zeros((h, w, 3), np.float32)
        self.temp = np.zeros((h, w), np.float32)
        self.emis = np.full((h, w), 0.95, np.float32)
        self.glow = np.zeros((h, w, 3), np.float32)  # light emitted in the visible (lamps, windows)
        self.glowing = False
        self.counts: dict[int, int] = {}
        self.grass = np.zeros(3)

    def new_instance(self, cls: int) -> int:
        n = self.counts.get(cls, 0)
        self.counts[cls] = n + 1
        return n

    def paint(self, region: tuple[slice, slice], mask: np.ndarray | None, cls: int, inst: int,
              albedo, temp: float, emis: float = 0.95, glow=None) -> None:
        """Set every map within `region` (a pair of slices), on `mask` there or everywhere (None)."""
        if mask is None:
            where: tuple = region
        else:
            rows, cols = np.nonzero(mask)  # once, instead of once per map
            if not len(rows):
                return
            where = (rows + region[0].start, cols + region[1].start)
        self.cls[where], self.inst[where], self.temp[where], self.emis[where] = cls, inst, temp, emis
        self.albedo[where] = albedo
        if glow is not None:
            self.glow[where] = glow
            self.glowing = True

    def ellipse(self, cx, cy, rx, ry, **kw) -> None:
        region, yy, xx = self._grid(cx - rx, cy - ry, cx + rx, cy + ry)
        if region is not None:
            self.paint(region, ((xx - cx) / max(rx, 0.5)) ** 2 + ((yy - cy) / max(ry, 0.5)) ** 2 <= 1, **kw)

    def rect(self, x0, y0, x1, y1, **kw) -> None:
        region, _, _ = self._grid(x0, y0, x1, y1)
        if region is not None:
            self.paint(region, None, **kw)

    def _grid(self, x0, y0, x1, y1):
        i0, i1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)) + 1, self.h)
        j0, j1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)) + 1, self.w)
        if i0 >= i1 or j0 >= j1:
            return None, None, None
        yy = np.arange(i0, i1, dtype=np.float32)[:, None] + 0.5
        xx = np.arange(j0, j1, dtype=np.float32)[None, :] + 0.5
        return (slice(i0, i1), slice(j0, j1)), yy, xx


def render_scene(index: int, seed: int = 0, size: int | tuple[int, int] = 256) -> Scene:
    """Scene `index` of the set `seed` at `size` (an int for square, or (height, width))."""
    h, w = (size, size) if isinstance(size, int) else size
    # Separate streams for layout, visible and infrared noise, so that a scene is the same at any size.
    rng, vis_rng, ir_rng = (np.random.default_rng([seed, index, k]) for k in range(3))
    cv = _Canvas(h, w, rng)
    time = rng.choice(["day", "dusk", "night"], p=[0.45, 0.2, 0.35])
    air = {"day": 17.0, "dusk": 14.0, "night": 11.0}[time] + rng.normal(0, 1.5)
    sun = {"day": 1.0, "dusk": 0.4, "night": 0.0}[time]
    horizon = h * rng.uniform(0.3, 0.5)
    _paint_ground(cv, horizon, air, sun)
    _paint_background(cv, horizon, air, sun, time)
    _paint_instances(cv, horizon, air, sun, time)
    vis = _visible(cv, horizon, time, vis_rng)
    ir = _infrared(cv, horizon, time, ir_rng)
    semantic = colourise(cv.cls, cv.inst)
    return Scene(visible=_to_uint8(vis), infrared=_to_uint8(ir), semantic=semantic, classes=cv.cls)


# ----------------------------------------------------------------------------------------------
# Stuff: sky, ground, road, water, buildings, trees


def _paint_ground(cv: _Canvas, horizon: float, air: float, sun: float) -> None:
    rng, h, w = cv.rng, cv.h, cv.w
    cv.rect(0, 0, w, horizon, cls=SKY, inst=0, albedo=(0.5, 0.6, 0.8), temp=-30.0, emis=1.0)
    grass = np.array([0.25, 0.45, 0.15]) * rng.uniform(0.7, 1.3) + rng.uniform(-0.05, 0.1, 3)
    cv.grass = grass.clip(0, 1)
    cv.rect(0, horizon, w, h, cls=GRASS, inst=0, albedo=cv.grass, temp=air + sun)
    if rng.random() < 0.4:  # a lake or river band
        y0 = horizon + (h - horizon) * rng.uniform(0.0, 0.3)
        cv.rect(0, y0, w, y0 + (h - horizon) * rng.uniform(0.1, 0.25), cls=WATER, inst=0,
                albedo=(0.15, 0.25, 0.35), temp=air - 3.0, emis=0.96)
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, :] + 0.5
    asphalt = rng.uniform(0.15, 0.3)
    if rng.random() < 0.5:  # a road running into the distance
        vx, half = w * rng.uniform(0.3, 0.7), rng.uniform(0.4, 0.9) * w / max(h - horizon, 1)
        depth = yy - horizon
        road = (depth > 0) & (np.abs(xx - vx) < depth * half)
        walk = (depth > 0) & ~road & (np.abs(xx - vx) < depth * half * 1.25)
    else:  # a road across the view
        y0 = horizon + (h - horizon) * rng.uniform(0.35, 0.6)
        y1 = min(y0 + (h - horizon) * rng.uniform(0.25, 0.4), h)
        road = np.broadcast_to((yy >= y0) & (yy < y1), (h, w))
        walk = np.broadcast_to((yy >= y0 - (h - horizon) * 0.06) & (yy < y0), (h, w))
    full = (slice(0, h), slice(0, w))
    cv.paint(full, walk, cls=PAVEMENT, inst=0, albedo=(0.55, 0.54, 0.52), temp=air + 4 * sun + 1)
    cv.paint(full, road, cls=ROAD, inst=0, albedo=(asphalt,) * 3, temp=air + 6 * sun + 3)


def _paint_background(cv: _Canvas, horizon: float, air: float, sun: float, time: str) -> None:
    rng, h, w = cv.rng, cv.h, cv.w
    for _ in range(rng.integers(0, 4)):  # buildings standing on the horizon
        bw, bh = w * rng.uniform(0.12, 0.3), h * rng.uniform(0.1, 0.35)
        x0, base = rng.uniform(-0.1, 0.9) * w, horizon + h * rng.uniform(0.0, 0.04)
        wall = _WALLS[rng.integers(len(_WALLS))] * rng.uniform(0.85, 1.1)
        cv.rect(x0, base - bh, x0 + bw, base, cls=BUILDING, inst=0, albedo=wall.clip(0, 1),
                temp=air + 2 * sun + 1)
        step = bw / rng.integers(3, 7)
        lit_p = 0.5 if time == "night" else 0.0
        windows = np.random.default_rng(rng.integers(2**63))  # own stream: their count varies with size
        for wy in np.arange(base - bh + step * 0.4, base - step * 0.6, step):
            for wx in np.arange(x0 + step * 0.3, x0 + bw - step * 0.6, step):
                lit = windows.random() < lit_p
                cv.rect(wx, wy, wx + step * 0.5, wy + step * 0.45, cls=BUILDING, inst=0,
                        albedo=(0.9, 0.8, 0.5) if lit else _GLASS, temp=air + (8 if lit else 0),
                        emis=0.85, glow=(0.8, 0.65, 0.35) if lit else None)
    for _ in range(rng.integers(0, 5)):  # trees
        th = h * rng.uniform(0.12, 0.35)
        x, base = rng.uniform(0, w), horizon + h * rng.uniform(0.0, 0.08)
        leaf = np.array([0.15, 0.35, 0.12]) * rng.uniform(0.6, 1.4)
        cv.rect(x - th * 0.04, base - th * 0.45, x + th * 0.04, base, cls=TREE, inst=0,
                albedo=(0.3, 0.2, 0.12), temp=air + sun)
        cv.ellipse(x, base - th * 0.65, th * rng.uniform(0.2, 0.35), th * 0.38, cls=TREE, inst=0,
                   albedo=leaf.clip(0, 1), temp=air - 2.0)


# ----------------------------------------------------------------------------------------------
# Things: persons, statues, cars, animals, lamps


def _paint_instances(cv: _Canvas, horizon: float, air: float, sun: float, time: str) -> None:
    rng, h, w = cv.rng, cv.h, cv.w
    kinds = (["person"] * rng.integers(1, 5) + ["statue"] * rng.integers(0, 4)
             + ["car"] * rng.integers(0, 4) + ["animal"] * rng.integers(0, 2) + ["lamp"] * rng.integers(0, 3))
    feet = horizon + (h - horizon) * rng.uniform(0.08, 1.0, len(kinds))
    outfits: list[tuple] = []
    for kind, foot in sorted(zip(kinds, feet), key=lambda kf: kf[1]):
        scale = h * (0.25 + 0.6 * (foot - horizon) / max(h - horizon, 1)) * rng.uniform(0.8, 1.2)
        x = rng.uniform(0.05, 0.95) * w
        if kind in ("person", "statue"):
            if kind == "statue" and outfits and rng.random() < 0.7:
                outfit = outfits[rng.integers(len(outfits))]
            elif kind == "person" and rng.random() < 0.15:  # camouflage: dressed like the vegetation
                outfit = (cv.grass * 0.9, (cv.grass * 1.1).clip(0, 1), _SKIN[rng.integers(len(_SKIN))])
            else:
                outfit = (_CLOTHES[rng.integers(len(_CLOTHES))], _CLOTHES[rng.integers(len(_CLOTHES))],
                          _SKIN[rng.integers(len(_SKIN))])
            outfits.append(outfit)
            if kind == "person":
                _figure(cv, x, foot, scale * 0.55, PERSON, outfit, skin_t=34.0, cloth_t=28.0)
            else:
                _figure(cv, x, foot, scale * 0.55, STATUE, outfit, skin_t=air + 2 * sun, cloth_t=air + 2 * sun)
        elif kind == "car":
            _car(cv, x, foot, scale * 0.5, running=rng.random() < 0.5, air=air, sun=sun)
        elif kind == "animal":
            _animal(cv, x, foot, scale * 0.3)
        else:
            _lamp(cv, x, foot, scale * 0.9, lit=time != "day", air=air)


def _figure(cv: _Canvas, x, foot, height, cls, outfit, skin_t, cloth_t) -> None:
    """A standing person (or a statue of one): legs, torso, arms, head."""
    shirt, trousers, skin = outfit
    inst = cv.new_instance(cls)
    u = height / 8.0  # head height
    kw = dict(cls=cls, inst=inst)
    cv.rect(x - 1.0 * u, foot - 4 * u, x - 0.1 * u, foot, albedo=trousers, temp=cloth_t, **kw)
    cv.rect(x + 0.1 * u, foot - 4 * u, x + 1.0 * u, foot, albedo=trousers, temp=cloth_t, **kw)
    cv.rect(x - 1.1 * u, foot - 7 * u, x + 1.1 * u, foot - 3.8 * u, albedo=shirt, temp=cloth_t, **kw)
    cv.rect(x - 1.5 * u, foot - 6.8 * u, x - 1.1 * u, foot - 4.2 * u, albedo=shirt, temp=cloth_t, **kw)
    cv.rect(x + 1.1 * u, foot - 6.8 * u, x + 1.5 * u, foot - 4.2 * u, albedo=shirt, temp=cloth_t, **kw)
    cv.ellipse(x, foot - 7.5 * u, 0.55 * u, 0.62 * u, albedo=skin, temp=skin_t, **kw)


def _car(cv: _Canvas, x, foot, length, running: bool, air: float, sun: float) -> None:
    """A car seen from the side; a running one has a hot engine and warm wheels."""
    rng = cv.rng
    cls = CAR_RUNNING if running else CAR
    inst = cv.new_instance(cls)
    paint = _PAINT[rng.integers(len(_PAINT))]
    ht = length * 0.38
    body_t = air + (6.0 if running else 2 * sun)
    x0, x1 = x - length / 2, x + length / 2
    front = 1 if rng.random() < 0.5 else -1
    kw = dict(cls=cls, inst=inst)
    cv.rect(x0, foot - ht * 0.85, x1, foot - ht * 0.2, albedo=paint, temp=body_t, emis=0.9, **kw)
    hood = (x1 - length * 0.3, x1) if front > 0 else (x0, x0 + length * 0.3)
    cv.rect(hood[0], foot - ht * 0.85, hood[1], foot - ht * 0.35, albedo=paint,
            temp=air + (35.0 if running else 2 * sun), emis=0.9, **kw)
    cv.rect(x0 + length * 0.22, foot - ht * 1.35, x1 - length * 0.22, foot - ht * 0.85, albedo=paint,
            temp=body_t, emis=0.9, **kw)
    cv.rect(x0 + length * 0.27, foot - ht * 1.27, x1 - length * 0.27, foot - ht * 0.9, albedo=_GLASS,
            temp=air + (4.0 if running else 0.0), emis=0.85, **kw)
    for wx in (x0 + length * 0.2, x1 - length * 0.2):
        cv.ellipse(wx, foot - ht * 0.2, ht * 0.22, ht * 0.22, albedo=(0.06, 0.06, 0.06),
                   temp=air + (15.0 if running else 0.0), **kw)


def _animal(cv: _Canvas, x, foot, length) -> None:
    """A dog or a horse: body, legs, head; warm fur."""
    rng = cv.rng
    cls = HORSE if rng.random() < 0.4 else DOG
    length *= 2.0 if cls == HORSE else 1.0
    inst = cv.new_instance(cls)
    fur = _FUR[rng.integers(len(_FUR))]
    kw = dict(cls=cls, inst=inst, albedo=fur, temp=30.0)
    leg = length * 0.35
    cv.ellipse(x, foot - leg - length * 0.12, length * 0.5, length * 0.18, **kw)
    for lx in (x - length * 0.35, x + length * 0.3):
        cv.rect(lx - length * 0.05, foot - leg - length * 0.05, lx + length * 0.05, foot, **kw)
    side = 1 if rng.random() < 0.5 else -1
    cv.ellipse(x + side * length * 0.55, foot - leg - length * 0.35, length * 0.16, length * 0.12, **kw)


def _lamp(cv: _Canvas, x, foot, height, lit: bool, air: float) -> None:
    """A street lamp: a cold metal pole and a head, hot and glowing when lit."""
    inst = cv.new_instance(LIGHT)
    kw = dict(cls=LIGHT, inst=inst)
    cv.rect(x - height * 0.015, foot - height, x + height * 0.015, foot, albedo=(0.35, 0.35, 0.38),
            temp=air, emis=0.3, **kw)
    cv.ellipse(x, foot - height, height * 0.06, height * 0.035, albedo=(0.95, 0.9, 0.7) if lit else (0.8, 0.8, 0.8),
               temp=air + (45.0 if lit else 0.0), glow=(2.0, 1.8, 1.2) if lit else None, **kw)


# ----------------------------------------------------------------------------------------------
# Imaging: visible camera and thermal camera


def _visible(cv: _Canvas, horizon: float, time: str, rng: np.random.Generator) -> np.ndarray:
    h, w = cv.h, cv.w
    light, tint, noise = {"day": (1.0, (1.0, 1.0, 1.0), 0.01), "dusk": (0.55, (1.0, 0.8, 0.6), 0.02),
                          "night": (0.1, (0.7, 0.8, 1.0), 0.03)}[time]
    top, bottom = {"day": ((0.35, 0.55, 0.9), (0.75, 0.85, 0.95)), "dusk": ((0.3, 0.25, 0.5), (0.95, 0.6, 0.35)),
                   "night": ((0.02, 0.03, 0.08), (0.08, 0.09, 0.15))}[time]
    texture = 1 + 0.15 * _smooth_noise(rng, h, w, 12) + 0.06 * _smooth_noise(rng, h, w, 48)
    img = cv.albedo * texture[..., None]
    img *= light * np.array(tint, np.float32)
    rows, ramp, sky = _sky(cv, horizon)  # the sky: a gradient to the horizon instead of an albedo
    gradient = np.float32(top) * (1 - ramp[..., None]) + np.float32(bottom) * ramp[..., None]
    img[:rows][sky] = (gradient * (0.9 + 0.1 * texture[:rows, :, None]))[sky]
    if time != "day" and cv.glowing:  # lamps and lit windows light their surroundings
        img = img * (1 + 3 * _blur(cv.glow.max(-1), 8)[..., None]) + cv.glow * 0.5
    img += _sensor_noise(rng, img.shape, noise)
    return img


def _infrared(cv: _Canvas, horizon: float, time: str, rng: np.random.Generator) -> np.ndarray:
    h, w = cv.h, cv.w
    rows, ramp, sky = _sky(cv, horizon)
    temp = cv.temp.copy()
    temp[:rows][sky] = np.broadcast_to(-30.0 + 25 * ramp, sky.shape)[sky]  # colder overhead
    emitted = (temp - T_LOW) / (T_HIGH - T_LOW)
    reflected = (-25.0 - T_LOW) / (T_HIGH - T_LOW)
    ir = (cv.emis * emitted + (1 - cv.emis) * reflected).astype(np.float32)
    ir = ir + 0.03 * _smooth_noise(rng, h, w, 16)
    ir = 0.7 * ir + 0.3 * _blur(ir, 2)  # optics
    ir = ir + 0.3 * _blur(np.maximum(ir - 0.75, 0), 6)  # heat halo around hot objects
    if rng.random() < 0.5:  # vignetting
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ir = ir * (1 - 0.08 * (((yy / h - 0.5) ** 2 + (xx / w - 0.5) ** 2) * 4))
    return ir + _sensor_noise(rng, ir.shape, 0.012)


def _sky(cv: _Canvas, horizon: float) -> tuple[int, np.ndarray, np.ndarray]:
    """Rows down to the horizon, their height as a fraction of it `[rows, 1]`, and the sky mask there."""
    rows = int(min(np.ceil(horizon), cv.h))
    ramp = (np.arange(rows, dtype=np.float32) / max(horizon, 1))[:, None]
    return rows, ramp, cv.cls[:rows] == SKY


def _sensor_noise(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Uniform pixel noise of standard deviation `std` (uniform draws are 3x faster than normal)."""
    noise = rng.random(shape, dtype=np.float32)
    noise -= np.float32(0.5)
    noise *= np.float32(std * 12**0.5)
    return noise


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-scale noise smooth over about `max(h, w) / cells` pixels."""
    ch, cw = max(2, round(cells * h / max(h, w))), max(2, round(cells * w / max(h, w)))
    low = Image.fromarray(rng.standard_normal((ch, cw)).astype(np.float32))
    return np.asarray(low.resize((w, h), Image.Resampling.BICUBIC))


def _blur(a: np.ndarray, factor: int) -> np.ndarray:
    """A cheap blur of a float map: box down by `factor`, bilinear back up."""
    h, w = a.shape
    small = Image.fromarray(a.astype(np.float32)).resize((max(1, w // factor), max(1, h // factor)),
                                                              Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR))


def _to_uint8(a: np.ndarray) -> np.ndarray:
    np.clip(a, 0, 1, out=a)
    a *= 255
    a += 0.5
    return a.astype(np.uint8)
