"""Images from the real world, one table: each kind of bad input (rotated phone photos, giants, 16-bit
truths, non-finite outputs, class-id maps, colour-mapped infrared, hidden files) on small generated
files, through every command that reads it: the data loader, `data inspect`, `generate`, `evaluate`."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vis2ir.cli import main
from vis2ir.config import DataConfig, load_config
from vis2ir.data import DataError, build_dataset, inspect_source
from vis2ir.palette import colourise
from vis2ir.errors import Vis2IRError
from vis2ir.evaluate.run import evaluate_folders
from vis2ir.io.images import Normaliser, read_image, to_tensor
from vis2ir.generate import run_generate
from vis2ir.visualize import infrared_image

from tests.conftest import TINY_MODEL

H, W = 80, 48  # upright photos: portrait


def scene(seed: int = 0) -> dict[str, np.ndarray]:
    """A smooth portrait scene: visible RGB, grey infrared, a palette semantic map (two classes)."""
    yy, xx = np.mgrid[:H, :W]
    rng = np.random.default_rng(seed)
    vis = np.stack([xx * 5, yy * 3, (xx + yy) * 2], -1) + rng.integers(0, 20, (H, W, 3))
    classes = np.where(yy < H // 2, 119, 0)  # sky above, a person below
    return {"visible": vis.clip(0, 255).astype(np.uint8), "infrared": ((yy * 3 + 10) % 256).astype(np.uint8),
            "semantic": colourise(classes)}


def save(path: Path, array: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


def good(root: Path, names=("a", "b")) -> None:
    """Good pairs with maps: visible/, infrared/, semantic/ (a paired layout, and generate's inputs)."""
    for k, name in enumerate(names):
        s = scene(k)
        for kind in ("visible", "infrared", "semantic"):
            save(root / kind / f"{name}.png", s[kind])


# ----------------------------------------------------------------------------------------------
# The bad inputs


def exif_rotated(root: Path) -> None:
    """A phone JPEG stored sideways with EXIF Orientation 6: shown upright as 48x80, like its infrared."""
    good(root, ["a"])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to show
    sideways = Image.fromarray(scene(1)["visible"]).transpose(Image.Transpose.ROTATE_90)  # stored 80x48
    (root / "visible").mkdir(parents=True, exist_ok=True)
    sideways.save(root / "visible" / "b.jpg", quality=95, exif=exif.tobytes())
    save(root / "infrared" / "b.png", scene(1)["infrared"])
    save(root / "semantic" / "b.png", scene(1)["semantic"])


def giant(root: Path) -> None:
    """An image above the pixel limit (the test lowers the limit to 5000 pixels: 100x100 is a 'bomb')."""
    good(root, ["a"])
    s = scene(1)
    save(root / "visible" / "b.png", np.zeros((100, 100, 3), np.uint8))
    save(root / "infrared" / "b.png", np.zeros((100, 100), np.uint8))
    save(root / "semantic" / "b.png", colourise(np.zeros((100, 100), int)))
    del s


def class_id_map(root: Path) -> None:
    """A one-channel map of class ids (0 person, 119 sky) instead of palette colours."""
    good(root, ["a"])
    s = scene(1)
    for kind in ("visible", "infrared"):
        save(root / kind / "b.png", s[kind])
    yy = np.mgrid[:H, :W][0]
    save(root / "semantic" / "b.png", np.where(yy < H // 2, 119, 0).astype(np.uint8))


def foreign_colours(root: Path) -> None:
    """A colour map from another tool: colours far from the palette."""
    good(root, ["a"])
    s = scene(1)
    for kind in ("visible", "infrared"):
        save(root / kind / "b.png", s[kind])
    save(root / "semantic" / "b.png", np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8))


def wrong_aspect_map(root: Path) -> None:
    """A semantic map of another aspect ratio than its photo."""
    good(root, ["a"])
    s = scene(1)
    for kind in ("visible", "infrared"):
        save(root / kind / "b.png", s[kind])
    save(root / "semantic" / "b.png", colourise(np.zeros((H, H), int)))


def ironbow_infrared(root: Path) -> None:
    """Infrared exported through the ironbow palette (RGB): its brightness is not the heat order."""
    good(root, ["a"])
    s = scene(1)
    save(root / "visible" / "b.png", s["visible"])
    save(root / "semantic" / "b.png", s["semantic"])
    save(root / "infrared" / "b.png", infrared_image(s["infrared"] / 255.0, 8, "ironbow"))


def hidden_files(root: Path) -> None:
    """macOS sidecars, .DS_Store and Thumbs.db beside good pairs (none of them images)."""
    good(root)
    for kind in ("visible", "infrared", "semantic"):
        for name in ("._a.png", "._b.png", ".DS_Store", "Thumbs.db"):
            (root / kind / name).write_bytes(b"\x00\x05\x16\x07 AppleDouble, not an image")
    (root / "._train.txt").write_bytes(b"\x00\x05\x16\x07")


def sixteen_bit(root: Path) -> None:
    """16-bit raw-count infrared (1000..9000), and as predictions the 8-bit PNGs generate writes for a
    perfect model: the truth normalised as training does (percentile), in [0, 255]."""
    good(root, ["a", "b"])
    for k, name in enumerate(("a", "b")):
        raw = (1000 + scene(k)["infrared"].astype(np.uint16) * 31 + np.arange(W, dtype=np.uint16)).astype(np.uint16)
        (root / "infrared" / f"{name}.png").unlink()
        save(root / "infrared" / f"{name}.png", raw)
        save(root / "pred" / f"{name}.png", infrared_image(Normaliser()(raw)))


# ----------------------------------------------------------------------------------------------
# The commands (each returns what the user sees, as one string)


def cfg_data(root: Path, **kw) -> DataConfig:
    return DataConfig(source=str(root), size=32, resize_policy="resize", val_fraction=0.0, test_fraction=0.0, **kw)


def run_data(root: Path, **_) -> str:
    """Build the train split and load every sample (as training does)."""
    try:
        ds = build_dataset(cfg_data(root), "train")
        return f"ok {len(ds)}: " + ", ".join(sorted(ds[i]["name"] for i in range(len(ds))))
    except DataError as err:
        return f"error: {err}"


def run_inspect(root: Path, **_) -> str:
    report = inspect_source(cfg_data(root), out=root / "sheet.png")
    return f"{sum(report['counts'].values())} samples; problems: " + " | ".join(report["problems"])


@pytest.fixture(scope="module")
def model_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "concat.yaml"
    cache = tmp_path_factory.mktemp("prompt_cache")
    load_config(None, [*TINY_MODEL, f"model.prompt_cache_dir={cache}", "model.codec=pixel", "sample.steps=1",
                       "sample.guidance=1.0", "model.semantic.mode=channel_concat"]).save(path)
    return path


def run_generate_cmd(root: Path, config: Path, **_) -> str:
    """`vis2ir generate --input visible/ --semantic semantic/`: done items with their output sizes, failures."""
    out = root / "out"
    try:
        summary = run_generate(root / "visible", out, config=config, semantic=root / "semantic")
        failed = {}
    except Vis2IRError as err:
        summary, failed = None, str(err)
    done = sorted(p.stem + "=%dx%d" % Image.open(p).size for p in out.glob("*.png"))
    return f"done {' '.join(done)}; failed: {failed or (summary and summary.failed) or '-'}"


def run_evaluate(root: Path, **_) -> str:
    try:
        result = evaluate_folders(root / "pred", root / "infrared", out=root / "eval")
    except Vis2IRError as err:
        return f"error: {err}"
    m = result["metrics"]
    return f"psnr {min(m['psnr_native'], 99):.1f} ssim {m['ssim_native']:.3f}"


COMMANDS = {"data": run_data, "inspect": run_inspect, "generate": run_generate_cmd, "evaluate": run_evaluate}


@dataclass
class Case:
    kind: str  # the item and what it is
    write: callable
    command: str
    expect: str  # a regex the command's outcome must match (search)
    env: dict = field(default_factory=dict)
    pixel_limit: int | None = None  # a low Image.MAX_IMAGE_PIXELS, so that small files are "giants"


CASES = [
    # 8. EXIF orientation: sizes compared upright; generated at the upright size
    Case("8 exif", exif_rotated, "data", r"^ok 2: a, b$"),
    Case("8 exif", exif_rotated, "generate", r"^done a=48x80 b=48x80; failed: -$"),
    # 9. a decompression bomb / giant: one line naming the file and the way out; the run goes on
    Case("9 giant", giant, "data", r"visible/b\.png: the image is too large .*VIS2IR_MAX_IMAGE_PIXELS",
         pixel_limit=5000),
    Case("9 giant", giant, "generate", r"^done a=48x80; failed: 1 of 2 inputs failed: b \(.*visible/b\.png: the "
                                       r"image is too large \(100x100 = 10000 pixels, the limit is 5000",
         pixel_limit=5000),
    Case("9 bomb", giant, "generate", r"^done a=48x80; failed: 1 of 2 inputs failed: b \(.*visible/b\.png: the "
                                      r"image is too large \(10000 pixels, the limit is 4000", pixel_limit=4000),
    Case("9 giant", giant, "generate", r"^done a=48x80 b=100x100; failed: -$", {"VIS2IR_MAX_IMAGE_PIXELS": "0"},
         pixel_limit=5000),
    # 10. 16-bit raw-count truths are normalised as in training: a perfect prediction scores as one
    Case("10 16-bit", sixteen_bit, "evaluate", r"^psnr (4\d|5\d|99)\.\d ssim (0\.99\d|1\.000)$"),
    # 12. semantic maps that are not palette colours, or not the photo's aspect
    Case("12 class ids", class_id_map, "data", r"semantic/b\.png: the semantic map has one channel .*vis2ir segment"),
    Case("12 class ids", class_id_map, "inspect", r"semantic/b\.png: the semantic map has one channel"),
    Case("12 class ids", class_id_map, "generate", r"^done a=48x80; failed: .*semantic/b\.png: the semantic map "
                                                   r"has one channel .*colourise"),
    Case("12 foreign colours", foreign_colours, "data",
         r"semantic/b\.png: \d+% of the semantic map's pixels are far from every palette colour; make maps with "
         r"`vis2ir segment`"),
    Case("12 foreign colours", foreign_colours, "inspect", r"semantic/b\.png: \d+% of the semantic map's pixels"),
    Case("12 foreign colours", foreign_colours, "generate", r"^done a=48x80; failed: .*far from every palette"),
    Case("12 aspect", wrong_aspect_map, "generate", r"^done a=48x80; failed: .*semantic/b\.png: size mismatch: "
                                                    r"semantic map is 80x80, not the aspect ratio"),
    # 13. colour-mapped infrared
    Case("13 ironbow", ironbow_infrared, "data", r"infrared/b\.png: the infrared image is in colour .*ironbow"),
    Case("13 ironbow", ironbow_infrared, "inspect", r"^2 samples; problems: .*infrared/b\.png: the infrared image "
                                                    r"is in colour"),
    # 14. hidden and system files are not samples
    Case("14 hidden", hidden_files, "data", r"^ok 2: a, b$"),
    Case("14 hidden", hidden_files, "inspect", r"^2 samples; problems: $"),
    Case("14 hidden", hidden_files, "generate", r"^done a=48x80 b=48x80; failed: -$"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kind}-{c.command}" for c in CASES])
def test_bad_input_kinds(case, tmp_path, model_config, monkeypatch):
    if case.pixel_limit:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", case.pixel_limit)  # restored afterwards
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    case.write(tmp_path)
    outcome = COMMANDS[case.command](tmp_path, config=model_config)
    assert "\n" not in outcome
    assert re.search(case.expect, outcome), outcome


# ----------------------------------------------------------------------------------------------
# What the table cannot say in one line


def test_exif_rotated_photo_is_read_upright_everywhere(tmp_path):
    """The rotated JPEG's pixels, not only its size: the data loader, the reader and a truth all agree."""
    exif_rotated(tmp_path)
    upright = torch.from_numpy(scene(1)["visible"]).permute(2, 0, 1).float() / 255
    read = to_tensor(read_image(tmp_path / "visible" / "b.jpg"))
    assert read.shape == (3, H, W) and (read - upright).abs().mean() < 0.03
    cfg = DataConfig(source=str(tmp_path), size=16, resize_policy="resize", val_fraction=0.0, test_fraction=0.0,
                     hflip=False)
    ds = build_dataset(cfg, "train")
    sample = next(ds[i] for i in range(len(ds)) if ds[i]["name"] == "b")
    want = torch.nn.functional.interpolate(upright[None], size=(16, 16), mode="area")[0]
    assert (sample["visible"] - want).abs().mean() < 0.05


def test_data_convert_writes_the_rotated_photo_upright(tmp_path):
    """`data convert` writes the pixels as shown: the PNG carries no EXIF tag, so it must be upright."""
    from vis2ir.data.convert import convert_source

    exif_rotated(tmp_path / "src")
    cfg = DataConfig(source=str(tmp_path / "src"), val_fraction=0.0, test_fraction=0.0)
    out = convert_source(cfg, tmp_path / "out", "folder")
    converted = next((out / "visible").rglob("b.png"))
    upright = torch.from_numpy(scene(1)["visible"]).permute(2, 0, 1).float() / 255
    pixels = to_tensor(read_image(converted))
    assert pixels.shape == (3, H, W) and (pixels - upright).abs().mean() < 0.03


def test_16bit_truth_reads_the_same_in_the_loader_and_in_evaluate(tmp_path):
    """`evaluate --pred/--truth` reads a 16-bit truth exactly as the data loader does (data.ir_normalize)."""
    sixteen_bit(tmp_path)
    for method in ("percentile", "minmax", "fixed"):
        cfg = DataConfig(source=str(tmp_path), size=W, resize_policy="center_crop", ir_normalize=method,
                         ir_range=(0.0, 10000.0), val_fraction=0.0, test_fraction=0.0, hflip=False)
        ds = build_dataset(cfg, "train")
        loaded = next(ds[i] for i in range(len(ds)) if ds[i]["name"] == "a")["infrared"]
        truth = to_tensor(read_image(tmp_path / "infrared" / "a.png"), "truth", Normaliser.of(cfg))
        top = (H - W) // 2
        assert torch.allclose(loaded, truth[:, top:top + W], atol=1e-6), method


def test_giant_in_a_generate_folder_is_one_line_and_the_run_goes_on(tmp_path, model_config, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    giant(tmp_path)
    code = main(["generate", "--config", str(model_config), "--input", str(tmp_path / "visible"), "--semantic",
                 str(tmp_path / "semantic"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("vis2ir: error")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "b.png: the image is too large" in errors[0] and (tmp_path / "out" / "a.png").exists()


def test_non_finite_outputs_fail_the_item_and_write_nothing(tmp_path, model_config, monkeypatch, caplog):
    """A broken model's NaN: the item fails with a message, the others are written (generate), and
    `evaluate` leaves a NaN prediction out instead of scoring a zero image."""
    import vis2ir.pipeline as pipeline

    real = pipeline.generate

    def broken(model, x, s, **kw):
        out = real(model, x, s, **kw)
        out[1:] = float("nan")  # every image after the first of a batch
        return out

    monkeypatch.setattr(pipeline, "generate", broken)
    good(tmp_path, ["a", "b", "c"])
    with pytest.raises(Vis2IRError, match=r"2 of 3 inputs failed: b \(the model's output is not finite"):
        run_generate(tmp_path / "visible", tmp_path / "out", config=model_config, semantic=tmp_path / "semantic",
                     batch_size=3)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["a.png"]
    with pytest.raises(pipeline.NonFiniteOutput) as err:
        pipeline.Vis2IRPipeline.from_config(model_config, device="cpu")(
            [scene(0)["visible"]] * 2, [scene(0)["semantic"]] * 2, batch_size=2)
    assert err.value.bad == [1] and err.value.output.images[0] is not None and err.value.output.images[1] is None

    nan = np.full((H, W), np.nan, np.float32)
    (tmp_path / "pred").mkdir()
    Image.fromarray(scene(0)["infrared"]).save(tmp_path / "pred" / "a.png")
    Image.fromarray(scene(1)["infrared"]).save(tmp_path / "pred" / "b.png")
    Image.fromarray(nan, mode="F").save(tmp_path / "pred" / "c.tif")
    with caplog.at_level(logging.ERROR), pytest.raises(Vis2IRError, match=r"1 of 3 pairs failed .*c\.tif: the "
                                                                          r"prediction is not finite"):
        evaluate_folders(tmp_path / "pred", tmp_path / "infrared", out=tmp_path / "eval")
    import json

    report = json.loads(next((tmp_path / "eval").glob("*.json")).read_text())
    assert report["images"] == 2 and "c" in report["failed"]


def test_checkpoint_generates_at_its_training_size(tmp_path, monkeypatch):
    """`generate --checkpoint` runs the model at the panel size it was trained at (longer side) and
    scales back; `--size native` (or 0) and `--size N` change it."""
    import vis2ir.pipeline as pipeline
    from vis2ir.checkpoint import add_lora, save_weights
    from vis2ir.model import build_model

    cfg = load_config(None, [*TINY_MODEL, f"model.prompt_cache_dir={tmp_path / 'pc'}", "model.codec=pixel",
                             "sample.steps=1", "sample.guidance=1.0", "model.semantic.mode=none", "data.size=32"])
    model = build_model(cfg)
    add_lora(model.transformer, cfg.model.lora)
    save_weights(tmp_path / "ckpt", model, cfg)
    seen = []
    real = pipeline.generate
    monkeypatch.setattr(pipeline, "generate", lambda model, x, s, **kw: seen.append(tuple(x.shape[-2:])) or
                        real(model, x, s, **kw))
    save(tmp_path / "in" / "photo.png", np.zeros((64, 128, 3), np.uint8))
    for extra, want in (([], (16, 32)), (["--size", "native"], (64, 128)), (["--size", "0"], (64, 128)),
                        (["--size", "64"], (32, 64))):
        seen.clear()
        assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--input", str(tmp_path / "in"), "--out",
                     str(tmp_path / "out"), "--overwrite", *extra]) == 0
        assert seen == [want], extra
        assert Image.open(tmp_path / "out" / "photo.png").size == (128, 64)
    assert pipeline.Vis2IRPipeline.from_config(cfg, device="cpu").generation_size() is None  # a config: native


def test_validation_grid_of_non_finite_samples_is_not_written(tiny_config, tmp_path, monkeypatch, caplog):
    """Training's validation picture of a model gone NaN: a warning, not a black grid."""
    import vis2ir.sample
    from vis2ir.model import build_model
    from vis2ir.train import Vis2IRModule

    cfg = tiny_config("model.codec=pixel", "model.semantic.mode=none", f"train.output_dir={tmp_path / 'run'}")
    module = Vis2IRModule(cfg, build_model(cfg))
    vis = torch.rand(2, 3, 16, 16)
    monkeypatch.setattr(vis2ir.sample, "generate", lambda *a, **k: torch.full_like(vis, float("nan")))
    with caplog.at_level(logging.WARNING, logger="vis2ir"):
        module._sample_grid(vis, vis, None)
    assert "validation samples are not finite" in caplog.text
    assert not (tmp_path / "run" / "samples").exists()
    monkeypatch.setattr(vis2ir.sample, "generate", lambda *a, **k: vis)  # finite: written as before
    module._sample_grid(vis, vis, None)
    assert len(list((tmp_path / "run" / "samples").glob("*.png"))) == 1


def test_16bit_outputs_of_generate_score_as_the_8bit_ones(tmp_path, model_config, capsys):
    """`generate --bit-depth 16` writes full-range values (0..65535 = [0, 1]) and says so in a PNG text chunk,
    so `evaluate --pred` on them gives the 8-bit outputs' figures (within 8-bit rounding) instead of
    normalising them by `data.ir_normalize` as if they were raw counts like the truths (a camera's fixed
    range here); `--pred-values` overrides the mark."""
    import json

    from vis2ir.io.images import is_full_range

    sixteen_bit(tmp_path)  # raw-count truths, 1000..9000
    camera = ["data.ir_normalize=fixed", "data.ir_range=[1000, 9000]"]
    for depth in (8, 16):
        run_generate(tmp_path / "visible", tmp_path / f"out{depth}", config=model_config,
                     semantic=tmp_path / "semantic", bit_depth=depth)
    deep = read_image(tmp_path / "out16" / "a.png")
    assert deep.mode in ("I;16", "I") and np.asarray(deep).max() > 255 and is_full_range(deep)
    assert not is_full_range(read_image(tmp_path / "infrared" / "a.png"))

    def scores(pred, overrides=camera, **kw):
        result = evaluate_folders(tmp_path / pred, tmp_path / "infrared", out=tmp_path / f"eval-{pred}",
                                  overrides=overrides, **kw)
        return per_image(result["per_image"])

    def per_image(rows):
        return {(r["name"], key): r[key] for r in rows for key in ("psnr_native", "ssim_native")}

    eight, sixteen = scores("out8"), scores("out16")
    assert len(eight) == 4
    for (name, key), value in eight.items():
        assert sixteen[name, key] == pytest.approx(value, abs=0.02 if key == "psnr_native" else 2e-3), (name, key)
    # with the default data.ir_normalize (percentile) too: before the mark, 16-bit scored 0.14 dB lower here
    assert scores("out16", []) == pytest.approx(scores("out8", []), abs=0.01)
    # Read as raw counts (what evaluate did before the mark): other figures
    as_counts = scores("out16", pred_values="ir-normalize")
    assert all(abs(as_counts[n, "psnr_native"] - eight[n, "psnr_native"]) > 1 for n in ("a", "b")), (as_counts, eight)

    # The same values re-saved without the mark (another tool): raw counts by default, full range on request
    for name in ("a", "b"):
        save(tmp_path / "plain" / f"{name}.png", np.asarray(read_image(tmp_path / "out16" / f"{name}.png")))
    assert not is_full_range(read_image(tmp_path / "plain" / "a.png"))
    assert scores("plain") == pytest.approx(as_counts)
    assert main(["evaluate", "--pred", str(tmp_path / "plain"), "--truth", str(tmp_path / "infrared"),
                 "--pred-values", "full-range", "--out", str(tmp_path / "cli"), *camera]) == 0
    report = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert per_image(report["per_image"]) == pytest.approx(sixteen)
    assert "--pred-values full-range" in report["scored"]["prediction"]
    with pytest.raises(Vis2IRError, match="--pred-values: 'fixed' is not one of auto, full-range, ir-normalize"):
        evaluate_folders(tmp_path / "plain", tmp_path / "infrared", out=tmp_path / "x", pred_values="fixed")
