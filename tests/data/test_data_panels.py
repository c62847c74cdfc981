"""Decoding panels: input modes, 16-bit normalisation, resize policies, paired flips, JPEG draft."""

import numpy as np
import pytest
import torch
from datafiles import save
from PIL import Image

from vis2ir.config import DataConfig
from vis2ir import palette
from vis2ir.data import build_dataset, open_source
from vis2ir.data.dataset import PanelDataset
from vis2ir.data.images import Normaliser, Panel, crop_box, decode_panel


def load_all(cfg: DataConfig, split: str = "val") -> PanelDataset:
    """Every sample of a source, whatever its split, decoded as `split` would be."""
    found, reader = open_source(cfg)
    return PanelDataset(found.records, reader, cfg, split, semantic=None)


def test_grey_rgba_and_palette_visible_and_24bit_grey_infrared_are_handled(tmp_path):
    grey = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))
    rgb = np.stack([grey, 255 - grey, np.full_like(grey, 77)], -1)
    save(tmp_path / "visible/a_grey.png", grey)
    save(tmp_path / "visible/b_rgba.png", np.concatenate([rgb, np.full_like(grey, 3)[..., None]], -1))
    Image.fromarray(rgb).quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(tmp_path / "visible/c_palette.png")
    for name in ("a_grey", "b_rgba", "c_palette"):
        save(tmp_path / f"infrared/{name}.png", np.stack([grey] * 3, -1))  # 24-bit grey, like M3FD
    ds = load_all(DataConfig(source=str(tmp_path), size=32))
    samples = {ds[i]["name"]: ds[i] for i in range(len(ds))}
    g = torch.from_numpy(grey).float() / 255
    assert torch.equal(samples["a_grey"]["visible"], g.expand(3, -1, -1))
    want = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    assert torch.equal(samples["b_rgba"]["visible"], want)  # alpha dropped, colours kept
    assert (samples["c_palette"]["visible"] - want).abs().max() < 0.05  # palette expanded to RGB
    for sample in samples.values():
        assert torch.equal(sample["infrared"], g.expand(3, -1, -1))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("method", ["minmax", "percentile", "fixed"])
def test_16bit_infrared_is_normalised_by_the_setting(tmp_path, suffix, method):
    raw = (np.linspace(1000, 9000, 32 * 32).reshape(32, 32)).astype(np.uint16)
    raw[0, 0] = 60000  # a hot outlier
    save(tmp_path / "visible/a.png", np.zeros((32, 32, 3), np.uint8))
    save(tmp_path / f"infrared/a{suffix}", raw)
    cfg = DataConfig(source=str(tmp_path), size=32, ir_normalize=method, ir_range=(0.0, 10000.0))
    ir = load_all(cfg)[0]["infrared"]
    assert ir.shape == (3, 32, 32) and ir.dtype == torch.float32
    assert torch.equal(ir[0], ir[2]) and 0 <= ir.min() and ir.max() <= 1
    if method == "minmax":  # the outlier takes the top, the rest is squeezed low
        assert ir[0, 0, 0] == 1 and ir[0, -1, -1] < 0.16
    elif method == "percentile":  # the outlier is clipped, the ramp spans [0, 1]
        assert ir[0, 0, 0] == 1 and ir[0, -1, -1] > 0.99 and ir[0, 0, 1] < 0.02
    else:
        assert abs(ir[0, -1, -1].item() - 0.9) < 0.01 and abs(ir[0, 0, 1].item() - 0.1) < 0.01


def test_16bit_infrared_vis2ir_wrote_is_read_at_full_range_by_every_reader(tmp_path):
    """A 16-bit PNG `generate` wrote says its values are [0, 1] at full range (`write_png(full_range=True)`): the
    data loader, `data convert` (folder and parquet) and `to_tensor` (evaluate's and generate's truths) read it as
    value/65535 instead of stretching it like raw counts; the same pixels without the mark are stretched."""
    from vis2ir.data.convert import convert_source
    from vis2ir.io.images import is_full_range, read_image, to_tensor, write_png

    values = np.linspace(0.3, 0.6, 32 * 32).reshape(32, 32)
    pixels = (values * 65535).round().astype(np.uint16)
    for name, marked in (("marked", True), ("plain", False)):
        save(tmp_path / name / "visible/a.png", np.zeros((32, 32, 3), np.uint8))
        write_png(tmp_path / name / "infrared/a.png", pixels, full_range=marked)
    want = torch.from_numpy(pixels.astype(np.float32) / 65535)
    cfg = DataConfig(source=str(tmp_path / "marked"), size=32)  # ir_normalize: percentile (the default)
    assert torch.allclose(load_all(cfg)[0]["infrared"][0], want, atol=1e-6)
    stretched = load_all(DataConfig(source=str(tmp_path / "plain"), size=32))[0]["infrared"][0]
    assert stretched.max() > 0.99 and stretched.min() < 0.01  # raw counts: percentiles 1-99 span 0..1
    for fmt in ("folder", "parquet"):
        out = convert_source(cfg, tmp_path / fmt, fmt)
        assert torch.allclose(load_all(DataConfig(source=str(out), size=32))[0]["infrared"][0], want, atol=1e-6)
    assert is_full_range(read_image(tmp_path / "folder" / "infrared" / "a.png"))
    normaliser = Normaliser.of(cfg)
    image = read_image(tmp_path / "marked" / "infrared" / "a.png")
    assert torch.allclose(to_tensor(image, "truth", normaliser)[0], want, atol=1e-6)
    assert torch.allclose(to_tensor(image, "prediction", normaliser, honour_mark=False)[0], stretched, atol=1e-6)


def test_normaliser_maths():
    a = np.array([[0, 100], [200, 1000]], np.uint16)
    assert np.allclose(Normaliser("minmax")(a), [[0, 0.1], [0.2, 1]])
    assert np.allclose(Normaliser("fixed", value_range=(100, 300))(a), [[0, 0], [0.5, 1]])


def _striped_source(tmp_path, w=96, h=64):
    """Visible: red | green | blue thirds; infrared: dark | mid | bright; semantic: 3 classes."""
    third = np.repeat(np.arange(3), w // 3)[None].repeat(h, 0)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    save(tmp_path / "visible/a.png", colours[third])
    save(tmp_path / "infrared/a.png", (np.array([20, 128, 235], np.uint8))[third])
    save(tmp_path / "semantic/a.png", palette.colourise(np.array([0, 2, 119])[third]))


def _columns(sample):
    """Per output column: which third the visible, infrared and semantic panels show there."""
    vis = sample["visible"].mean(1).argmax(0)
    ir = torch.bucketize(sample["infrared"][0].mean(0), torch.tensor([0.3, 0.7]))
    sem = torch.bucketize(palette.decode_classes(sample["semantic"])[16], torch.tensor([1, 100]))
    return vis, ir, sem


@pytest.mark.parametrize("policy,red", [("resize", 1 / 3), ("center_crop", 1 / 4)])
def test_resize_policies(tmp_path, policy, red):
    _striped_source(tmp_path)
    sample = load_all(DataConfig(source=str(tmp_path), size=32, resize_policy=policy))[0]
    vis, ir, sem = _columns(sample)
    assert abs((vis == 0).float().mean().item() - red) < 0.05
    assert torch.equal(vis, ir) and torch.equal(vis, sem)


def test_random_crop_and_flip_move_all_panels_together(tmp_path):
    _striped_source(tmp_path)
    (tmp_path / "train.txt").write_text("a\n")
    cfg = DataConfig(source=str(tmp_path), size=32, resize_policy="random_crop", hflip=True)
    ds = build_dataset(cfg, "train")
    torch.manual_seed(0)
    reds, flipped = set(), 0
    for _ in range(24):
        vis, ir, sem = _columns(ds[0])
        assert torch.equal(vis, ir) and torch.equal(vis, sem)  # the same crop and flip for every panel
        reds.add(int((vis == 0).sum()))
        flipped += int(vis[0] == 2)
    assert len(reds) > 3 and 0 < flipped < 24  # crops vary, about half are mirrored
    val = load_all(cfg, "val")  # no randomness outside training: the centre, never flipped
    assert all(int((_columns(val[0])[0] == 0).sum()) == 8 for _ in range(5))


def test_jpeg_is_decoded_at_reduced_scale_when_the_panel_is_large(tmp_path):
    y, x = np.mgrid[0:1024, 0:1280]
    image = np.stack([x * 255 // 1279, y * 255 // 1023, (x + y) % 256 // 4 * 4], -1).astype(np.uint8)
    save(tmp_path / "big.jpg", image, quality=92)
    panel = Panel(Image.open(tmp_path / "big.jpg"), "big.jpg")
    box = crop_box(panel.size, "center_crop", random=False)
    out = decode_panel(panel, "visible", box, 512, Normaliser())
    assert panel.image.size == (640, 512)  # decoded at half scale, not 1280x1024
    full = Image.open(tmp_path / "big.jpg").convert("RGB").resize((512, 512), Image.Resampling.BICUBIC,
                                                                  box=(128, 0, 1152, 1024))
    ref = torch.from_numpy(np.array(full)).permute(2, 0, 1).float() / 255
    assert 10 * torch.log10(1 / ((out - ref) ** 2).mean()) > 30  # PSNR of draft decode vs full decode
