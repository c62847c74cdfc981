"""Palettes, comparison images, attention heat-maps, and the locality of a trained RoPE adapter."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vis2ir.checkpoint import save_weights
from vis2ir.config import load_config
from vis2ir.cli import main
from vis2ir.data import CLASS_NAMES, ThermalScenes
from vis2ir.errors import Vis2IRError
from vis2ir.latents import encode_images
from vis2ir.model import build_model
from vis2ir.pipeline import Vis2IRPipeline
from vis2ir.figures import DPI, figure_array, text_width
from vis2ir.io.images import write_png
from vis2ir.visualize import (MIN_PICTURE_SIDE, AttentionMaps, class_attention, infrared_image, ironbow_lut,
                              labelled_grid, query_attention, received_attention, save_attention_maps)

from tests.conftest import TINY_MODEL

PANEL = 64  # pixel codec s=4: 8×8 tokens per panel


def test_palettes():
    grey = np.linspace(0, 1, 11)[None].repeat(3, 0)
    white = infrared_image(grey)
    assert white.dtype == np.uint8 and white[0, 0] == 0 and white[0, -1] == 255
    assert (infrared_image(grey, palette="black-hot") == 255 - white).all()
    deep = infrared_image(grey, bit_depth=16)
    assert deep.dtype == np.uint16 and deep[0, -1] == 65535 and deep[0, 5] == 32768
    iron = infrared_image(grey, palette="ironbow")
    assert iron.shape == (3, 11, 3)
    brightness = ironbow_lut().astype(float).sum(-1)
    assert (np.diff(brightness) >= 0).all() and brightness[0] < 30 and brightness[-1] > 740
    with pytest.raises(Vis2IRError, match="ironbow is 8-bit"):
        infrared_image(grey, bit_depth=16, palette="ironbow")


def test_write_png_is_atomic_and_keeps_16_bits(tmp_path):
    deep = (np.arange(64 * 48, dtype=np.uint32) * 21 % 65536).astype(np.uint16).reshape(48, 64)
    path = write_png(tmp_path / "sub" / "ir.png", deep)
    assert np.array_equal(np.asarray(Image.open(path)), deep)
    assert [p.name for p in path.parent.iterdir()] == ["ir.png"]


def test_labelled_grid_enlarges_tiles_and_fits_the_longest_label():
    """Transposed (one set per row): tiles scaled up to `cell`, the label column as wide as the longest
    name needs (never cut), infrared sets shown grey."""
    long_name = "mode=cross_attention__position=rope__inject_into=condition__num_heads=16"
    red = torch.zeros(3, 3, 16, 16)
    red[:, 0] = 1.0
    columns = {"visible": torch.zeros(3, 3, 16, 16), long_name: red}
    fig = labelled_grid(columns, rows=2, cell=64, transpose=True, title="t")
    sheet = figure_array(fig)
    label = text_width(long_name) * DPI
    assert sheet.shape[1] >= label + 2 * 64 and sheet.shape[1] <= label + 2 * 64 + 40  # the label's own width
    assert sheet.shape[0] >= 2 * 64
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(images) == 4 and all(a.shape[:2] == (16, 16) for a in images)
    grey = np.asarray(images[2])  # the long-named set's first tile: red (1, 0, 0) shown as its mean, grey
    assert (grey == grey[0, 0]).all() and grey[0, 0].tolist() == [85, 85, 85]
    assert long_name in [ax.get_ylabel() for ax in fig.axes]


def test_query_and_class_attention_on_known_maps():
    rows, cols = 2, 4  # two panels of 2×2 tokens over a 20×20 image
    weights = torch.zeros(1, 2, rows * cols, rows * cols)
    weights[0, 0, :, 1] = 1.0              # head 0: every query looks at semantic token (0, 1), left copy
    weights[0, 1, :, 1 * cols + 1] = 0.5   # head 1: half on (1, 1) of the left copy …
    weights[0, 1, :, 7] = 0.5              # … and half on (1, 1) of the right copy
    att = AttentionMaps(weights, rows, cols, size=(20, 20))
    maps = query_attention(att, x=15, y=2)
    assert maps.shape == (1, 2, 2, 2)
    assert maps[0, 0, 0, 1] == 1 and maps[0, 1, 1, 1] == 1
    received = received_attention(att)
    assert torch.allclose(received, torch.tensor([[0.0, 0.5], [0.0, 0.5]]))
    classes = np.zeros((20, 20), int)
    classes[:, 10:] = 7  # the right half of the image, which gets all the attention
    stats = class_attention(received, classes)
    assert stats[7]["mass"] == pytest.approx(1.0) and stats[7]["ratio"] == pytest.approx(2.0)
    assert stats[0]["mass"] == pytest.approx(0.0)
    with pytest.raises(Vis2IRError, match="outside"):
        query_attention(att, x=25, y=2)


def locality(att: AttentionMaps) -> tuple[float, float]:
    """Over a grid of query points: the share whose strongest key lies within one token of the
    point, and the mean attention mass within one token."""
    hits, mass = [], []
    for y in range(4, PANEL, 8):
        for x in range(4, PANEL, 8):
            m = query_attention(att, x, y).mean(dim=(0, 1))
            r, c = divmod(int(m.argmax()), m.shape[1])
            hits.append(abs(r - y // 8) <= 1 and abs(c - x // 8) <= 1)
            mass.append(float(m[max(0, y // 8 - 1):y // 8 + 2, max(0, x // 8 - 1):x // 8 + 2].sum()))
    return float(np.mean(hits)), float(np.mean(mass))


def trained_pipeline(position: str, scenes, cache_dir) -> Vis2IRPipeline:
    """A tiny model whose adapter alone was trained for a few seconds to add, to each token, the semantic
    token at its own place. The keys are ThermalScenes' semantic tokens made unique by noise, so only
    position can tell the right one from its look-alikes."""
    cfg = load_config(None, [*TINY_MODEL, f"model.prompt_cache_dir={cache_dir}", "model.codec=pixel",
                             f"data.size={PANEL}",  # trained on PANEL-pixel scenes: a checkpoint generates at it
                             "model.semantic.mode=cross_attention", f"model.semantic.position={position}",
                             "model.semantic.scale_init=1.0", "train.finetune=full", "sample.steps=4",
                             "sample.guidance=1.0"])
    torch.manual_seed(0)  # the adapter's initial weights
    model = build_model(cfg)
    vis = torch.stack([s["visible"] for s in scenes])
    sem_map = torch.stack([s["semantic"] for s in scenes])
    sem, ids = encode_images(model.codec, torch.cat([sem_map, sem_map], dim=-1))
    x_0, _ = encode_images(model.codec, torch.cat([vis, vis], dim=-1))
    opt = torch.optim.Adam(model.adapter.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small only lose time to threading (a lot, on a busy machine)
    try:
        for _ in range(120):
            t = torch.rand(len(scenes), 1, 1)
            x_t = (1 - t) * x_0 + t * torch.randn_like(x_0)
            keys = sem + torch.randn_like(sem)
            loss = (model.adapter(x_t, keys, ids) - x_t - keys).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return Vis2IRPipeline(model, cfg)


@pytest.fixture(scope="module")
def scenes():
    data = ThermalScenes(4, PANEL, seed=0)
    return [data[i] for i in range(len(data))]


@pytest.fixture(scope="module")
def rope_pipe(scenes, tmp_path_factory):
    return trained_pipeline("rope", scenes, tmp_path_factory.mktemp("pc"))


def test_rope_attention_concentrates_near_the_query(rope_pipe, scenes, tmp_path):
    plain = trained_pipeline("none", scenes, tmp_path / "pc")
    kwargs = dict(return_attention=True, output_type="pt")
    visible, semantic = [s["visible"] for s in scenes[:2]], [s["semantic"] for s in scenes[:2]]
    rope_att = rope_pipe(visible, semantic, **kwargs).attention
    plain_att = plain(visible, semantic, **kwargs).attention
    uniform = 9 / 64
    for att in rope_att:
        hits, mass = locality(att)
        assert hits > 0.9 and mass > 4 * uniform, (hits, mass)
    for att in plain_att:  # without positions the adapter cannot find the token at its own place
        assert locality(att)[1] < 1.3 * uniform, locality(att)

    visible = (scenes[0]["visible"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    semantic = (scenes[0]["semantic"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    written = save_attention_maps(tmp_path, visible, rope_att[0], [(10, 50)], semantic)
    assert sorted(p.name for p in written) == ["classes.json", "classes.png", "point0.png", "point0_heads.png"]
    # a 64-pixel scene is drawn at 256 pixels (with its title and colour bar around it)
    assert min(Image.open(tmp_path / "point0.png").size) > MIN_PICTURE_SIDE
    assert Image.open(tmp_path / "classes.png").size[1] > MIN_PICTURE_SIDE
    stats = json.loads((tmp_path / "classes.json").read_text())
    assert sum(s["mass"] for s in stats.values()) == pytest.approx(1.0, abs=1e-4)
    assert set(stats) <= set(CLASS_NAMES) | {"void"}


def test_visualize_command_on_a_checkpoint(rope_pipe, scenes, tmp_path):
    save_weights(tmp_path / "ckpt", rope_pipe.model, rope_pipe.cfg)
    for folder, key in (("vis", "visible"), ("sem", "semantic")):
        (tmp_path / folder).mkdir()
        for i, s in enumerate(scenes[:2]):
            Image.fromarray((s[key].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
                tmp_path / folder / f"scene{i}.png")
    out = tmp_path / "out"
    argv = ["visualize", "--checkpoint", str(tmp_path / "ckpt"), "--input", str(tmp_path / "vis"),
            "--semantic", str(tmp_path / "sem"), "--out", str(out), "--point", "8,8", "--point", "40,20"]
    assert main(argv) == 0
    for name in ("scene0", "scene1"):
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == ["classes.json", "classes.png", "point0.png", "point0_heads.png", "point1.png",
                         "point1_heads.png"]
    assert main(argv[:-2] + ["--point", "99,1"]) == 0  # outputs exist: skipped, nothing recomputed
    assert main(argv[:-2] + ["--point", "99,1", "--overwrite"]) == 2  # outside the 64×64 image
