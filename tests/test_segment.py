"""`vis2ir segment`, `--semantic auto` and `data.semantic_source: auto`, with a tiny random Mask2Former
built in code and saved with `save_pretrained`, so loading goes through the real local-path code."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from vis2ir import segment
from vis2ir.cli import main
from vis2ir.config import load_config
from vis2ir.data import build_dataset
from vis2ir.palette import CLASS_IDS, INSTANCE_SHADES, VOID, class_for_label, colourise, decode
from vis2ir.demo import DEMO_CHECKPOINT
from vis2ir.errors import Vis2IRError
from vis2ir.generate import run_generate

LABELS = {0: "person", 1: "car", 2: "road", 3: "sky-other-merged", 4: "mystery thing"}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny Mask2Former (Swin backbone, random weights) whose queries all say `person`, with masks
    sharp enough to give two person segments on a smooth image."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, use_pretrained_backbone=False, feature_size=32,
                            mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32, encoder_layers=1,
                            decoder_layers=2, num_attention_heads=2, dim_feedforward=32, num_queries=6,
                            id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(cfg).eval()
    with torch.no_grad():
        model.class_predictor.weight.zero_()
        model.class_predictor.bias.fill_(-5.0)
        model.class_predictor.bias[0] = 5.0  # every query: person
        head = dict(model.named_modules())["model.transformer_module.decoder.mask_predictor.mask_embedder.2.0"]
        head.weight.mul_(30)  # confident masks
    path = tmp_path_factory.mktemp("tiny_mask2former")
    model.save_pretrained(path)
    Mask2FormerImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 128}).save_pretrained(path)
    return str(path)


def smooth(h=48, w=80, shift=0):
    yy, xx = np.mgrid[:h, :w]
    return Image.fromarray(np.stack([xx * 3 + shift, yy * 5, (xx + yy) * 2], -1).clip(0, 255).astype(np.uint8))


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    smooth().save(folder / "a.png")
    smooth(shift=20).save(folder / "b.jpg")
    smooth(40, 40).save(folder / "c.png")
    return folder


@pytest.fixture
def count_calls(monkeypatch):
    """Counts images the segmenter model is run on."""
    calls = []
    real = segment.Segmenter.__call__

    def counted(self, images):
        calls.append(len(images))
        return real(self, images)

    monkeypatch.setattr(segment.Segmenter, "__call__", counted)
    return calls


def test_labels_map_to_the_palette_by_name():
    assert class_for_label("person") == CLASS_IDS["person"]
    assert class_for_label("sky-other-merged") == CLASS_IDS["sky-other-merged"]
    assert class_for_label("sky") == CLASS_IDS["sky-other-merged"]  # COCO suffixes dropped
    assert class_for_label("building, edifice") == CLASS_IDS["building-other-merged"]  # ADE20K synonyms
    assert class_for_label("vegetation") == CLASS_IDS["tree-merged"]  # Cityscapes alias
    assert class_for_label("mystery thing") == VOID


def test_segmenter_maps_labels_and_warns_about_unknown_ones(tiny_model, caplog):
    seg = segment.Segmenter(tiny_model, "cpu")
    assert seg.label_class == {0: CLASS_IDS["person"], 1: CLASS_IDS["car"], 2: CLASS_IDS["road"],
                               3: CLASS_IDS["sky-other-merged"], 4: VOID}
    assert "mystery thing" in caplog.text and "void" in caplog.text


def test_shapes_determinism_and_instances(tiny_model):
    seg = segment.Segmenter(tiny_model, "cpu")
    images = [smooth(), smooth(40, 40)]
    first, again = seg(images), seg(images)
    assert first[0].segment_ids.shape == (48, 80) and first[1].segment_ids.shape == (40, 40)
    for a, b in zip(first, again):
        assert np.array_equal(a.colours(), b.colours())
    p = first[0]
    colours = p.colours()
    assert colours.shape == (48, 80, 3) and colours.dtype == np.uint8
    people = [s for s in p.segments if s["class"] == "person"]
    assert len(people) >= 2 and [s["instance"] for s in people] == list(range(len(people)))
    # two instances of one class: different shades, both decode to the class
    shades = [colours[p.segment_ids == s["id"]][0] for s in people[:2]]
    assert not np.array_equal(*shades)
    classes, inst = decode(np.stack(shades))
    assert list(classes) == [CLASS_IDS["person"]] * 2 and inst[0] != inst[1]


def test_stuff_keeps_its_base_colour_and_unknown_labels_are_void():
    ids = np.array([[1, 2], [3, 0]], np.int32)
    segments = [{"id": 1, "class_id": CLASS_IDS["road"], "instance": 0},
                {"id": 2, "class_id": CLASS_IDS["car"], "instance": 1},
                {"id": 3, "class_id": VOID, "instance": 0}]
    rgb = segment.Panoptic(ids, segments).colours()
    assert np.array_equal(rgb[0, 0], colourise(np.array(CLASS_IDS["road"])))
    assert np.array_equal(rgb[0, 1].astype(int), colourise(np.array(CLASS_IDS["car"])).astype(int) + INSTANCE_SHADES[1])
    assert not rgb[1].any()  # void and no-segment pixels are black


def test_segment_command_writes_maps_ids_and_legend(tiny_model, photos, tmp_path, count_calls):
    out = tmp_path / "maps"
    assert main(["segment", "--input", str(photos), "--out", str(out), "--model", tiny_model,
                 "--batch-size", "2"]) == 0
    assert count_calls == [2, 1]
    for name, size in (("a", (80, 48)), ("b", (80, 48)), ("c", (40, 40))):
        rgb = Image.open(out / f"{name}.png")
        ids = Image.open(out / "segments" / f"{name}.png")
        assert rgb.mode == "RGB" and rgb.size == size and ids.size == size and ids.mode.startswith("I")
        info = json.loads((out / "segments" / f"{name}.json").read_text())
        seg_ids = np.asarray(ids)
        assert {s["id"] for s in info} == set(np.unique(seg_ids)) - {0}
        classes, _ = decode(np.asarray(rgb))
        for s in info:
            assert (classes[seg_ids == s["id"]] == s["class_id"]).all()
    legend = json.loads((out / "legend.json").read_text())
    assert legend["model"] == tiny_model and legend["labels"]["mystery thing"] == "void"
    assert [c["name"] for c in legend["classes"]] == ["person", "car", "road", "sky-other-merged"]
    assert Image.open(out / "legend.png").size[0] > 100

    # skip-existing: nothing to do, the model is not run; --overwrite redoes all
    before = (out / "a.png").stat().st_mtime_ns
    assert main(["segment", "--input", str(photos), "--out", str(out), "--model", tiny_model]) == 0
    assert count_calls == [2, 1] and (out / "a.png").stat().st_mtime_ns == before
    assert main(["segment", "--input", str(photos / "a.png"), "--out", str(out), "--model", tiny_model,
                 "--overwrite"]) == 0
    assert count_calls == [2, 1, 1]


def test_processes_split_the_inputs(tiny_model, photos, tmp_path, monkeypatch):
    out = tmp_path / "maps"
    done = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        done.append(segment.run_segment(photos, out, model=tiny_model, device="cpu").done)
    assert done == [["a", "c"], ["b"]]


@pytest.mark.parametrize("env, reason", [
    ({"HF_HUB_OFFLINE": "1"}, "not in the local Hub cache and HF_HUB_OFFLINE is set"),
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "the Hub cannot be reached"),
])
def test_missing_weights_message_is_fast_and_clear(env, reason, tmp_path, monkeypatch, hub_calls):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(Vis2IRError) as err:
        segment.Segmenter("facebook/mask2former-swin-large-coco-panoptic", "cpu")
    assert hub_calls == {"auth_check": int("HF_ENDPOINT" in env), "snapshot_download": 0}  # one request, no retry
    msg = str(err.value)
    assert reason in msg and "'facebook/mask2former-swin-large-coco-panoptic'" in msg
    assert "--model /path/to/model" in msg and "\n" not in msg


def test_missing_local_model_folder(tmp_path, capsys):
    (tmp_path / "in.png").write_bytes(b"")
    smooth().save(tmp_path / "in.png")
    code = main(["segment", "--input", str(tmp_path / "in.png"), "--out", str(tmp_path / "o"),
                 "--model", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no such folder" in err[0] and "nowhere" in err[0]
    assert "hf download" not in err[0]  # a path is not a Hub id
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(Vis2IRError, match="the folder lacks preprocessor_config.json"):
        segment.Segmenter(str(tmp_path / "half"), "cpu")


def test_generate_semantic_auto_on_the_demo_checkpoint(tiny_model, tmp_path, count_calls):
    photos = tmp_path / "photos"
    photos.mkdir()
    smooth(64, 64).save(photos / "s1.png")
    smooth(64, 64, shift=30).save(photos / "s2.png")
    out = tmp_path / "ir"
    summary = run_generate(photos, out, checkpoint=DEMO_CHECKPOINT, semantic="auto", segment_model=tiny_model,
                           steps=2, batch_size=2, device="cpu", compare=True)
    assert summary.done == ["s1", "s2"] and count_calls == [2]
    cached = photos / segment.AUTO_DIR / "s1.png"
    assert Image.open(cached).size == (64, 64) and Image.open(out / "s1.png").size == (64, 64)
    first = np.asarray(Image.open(out / "s1.png"))
    # the cache is reused: a second run does not run the segmenter, and gives the same infrared
    assert main(["generate", "--checkpoint", str(DEMO_CHECKPOINT), "--input", str(photos), "--out", str(out),
                 "--semantic", "auto", "--segment-model", tiny_model, "--steps", "2", "--batch-size", "2",
                 "--device", "cpu", "--overwrite"]) == 0
    assert count_calls == [2]
    assert np.array_equal(first, np.asarray(Image.open(out / "s1.png")))
    assert json.loads((photos / segment.AUTO_DIR / "legend.json").read_text())["model"] == tiny_model


def test_translate_semantic_auto(tiny_model, tmp_path, count_calls):
    """`translate --semantic auto`: the segmenter's maps are made once, cached in the output's state folder (never in
    the source), and used for every photo."""
    from vis2ir.translate.run import run_translate

    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    smooth(64, 64).save(src / "s1.png")
    smooth(64, 64, shift=30).save(src / "sub" / "s2.jpg")
    out = tmp_path / "ir"
    summary = run_translate(src, out, checkpoint=DEMO_CHECKPOINT, semantic="auto", segment_model=tiny_model,
                            steps=2, batch_size=2, workers=0, device="cpu")
    assert (summary.done, summary.failed) == (2, {}) and count_calls == [2]
    assert Image.open(out / ".vis2ir" / "semantic_auto" / "sub" / "s2.png").size == (64, 64)
    assert Image.open(out / "sub" / "s2.jpg").size == (64, 64) and not (src / segment.AUTO_DIR).exists()


def test_semantic_auto_cache_gets_its_legend_from_any_rank(tiny_model, tmp_path, count_calls, monkeypatch):
    """Under torchrun the rank that makes the maps writes legend.json, not only rank 0 (which may find
    every map already made by the others)."""
    smooth(32, 32).save(tmp_path / "a.png")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cache = tmp_path / segment.AUTO_DIR
    assert segment.ensure_maps([("a", tmp_path / "a.png", cache)], tiny_model, "cpu") == {}
    assert count_calls == [1] and segment.map_path(cache, "a").is_file()
    assert json.loads((cache / "legend.json").read_text())["model"] == tiny_model


def test_dataset_semantic_auto(tiny_model, tmp_path, count_calls):
    root = tmp_path / "pairs"
    for kind in ("visible", "infrared"):
        (root / kind / "train").mkdir(parents=True)
    for i in range(3):
        smooth(64, 64, shift=10 * i).save(root / "visible" / "train" / f"{i}.png")
        Image.fromarray(np.full((64, 64), 40 * i, np.uint8)).save(root / "infrared" / "train" / f"{i}.png")
    overrides = [f"data.source={root}", "data.size=32", "data.val_fraction=0", "data.test_fraction=0",
                 "data.semantic_source=auto", f"data.segment_model={tiny_model}"]
    cfg = load_config(None, overrides).data
    ds = build_dataset(cfg, "train", require_semantic=True)
    assert len(ds) == 3 and sum(count_calls) == 3
    assert (root / segment.AUTO_DIR / "train" / "0.png").is_file()
    assert ds[0]["semantic"].shape == (3, 32, 32)
    build_dataset(cfg, "train", require_semantic=True)
    assert sum(count_calls) == 3  # cached maps reused


def test_semantic_auto_says_why_a_samples_own_map_was_passed_over(tiny_model, tmp_path, count_calls, caplog):
    """A map the loader cannot take (here two suffixes of one name in a flat semantic folder) is replaced by a made
    one under data.semantic_source=auto, and the log says so and why, instead of passing it over silently."""
    root = tmp_path / "pairs"
    for kind in ("visible", "infrared"):
        (root / kind / "train").mkdir(parents=True)
    (root / "semantic").mkdir()
    for i in range(2):
        smooth(64, 64, shift=10 * i).save(root / "visible" / "train" / f"{i}.png")
        Image.fromarray(np.full((64, 64), 40 * i, np.uint8)).save(root / "infrared" / "train" / f"{i}.png")
    for suffix in ("png", "jpg"):  # the map of train/0, twice
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "semantic" / f"0.{suffix}")
    cfg = load_config(None, [f"data.source={root}", "data.size=32", "data.val_fraction=0", "data.test_fraction=0",
                             "data.semantic_source=auto", f"data.segment_model={tiny_model}"]).data
    with caplog.at_level(logging.WARNING):
        assert len(build_dataset(cfg, "train", require_semantic=True)) == 2
    assert "1 samples get a made map although" in caplog.text and "several semantic maps named 0.*" in caplog.text


def test_bad_settings():
    with pytest.raises(Vis2IRError, match="data.semantic_source"):
        load_config(None, ["data.semantic_source=maybe"])


HEAVY_MODULES = ("transformers.modeling_utils", "transformers.models.mask2former", "transformers.processing_utils")


@pytest.mark.parametrize("case", ["config without weights", "hub id offline"])
def test_segment_without_weights_answers_before_importing_the_model_code(case, tiny_model, tmp_path):
    """`vis2ir segment` with no usable weights: one line, exit 2, and transformers' model code is not
    imported (it takes seconds): checked in a fresh process's `sys.modules`, not by timing."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import vis2ir

    smooth().save(tmp_path / "in.png")
    if case == "config without weights":  # an interrupted copy: config files, no weights
        model = tmp_path / "half"
        shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
        expected = "has no weights file"
    else:
        model, expected = "facebook/mask2former-swin-large-coco-panoptic", "HF_HUB_OFFLINE is set"
    code = (f"import sys\nfrom vis2ir.cli import main\n"
            f"code = main(['segment', '--input', {str(tmp_path / 'in.png')!r}, "
            f"'--out', {str(tmp_path / 'o')!r}, '--model', {str(model)!r}])\n"
            f"print(code, [m for m in {HEAVY_MODULES!r} if m in sys.modules])")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(Path(vis2ir.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.stdout.split("\n")[0] == "2 []", proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vis2ir: error:")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("how", ["generate", "data"])
@pytest.mark.parametrize("model", ["hub id", "missing path"])
def test_segmenter_errors_name_the_real_flag_and_no_maps_are_announced_before_it_loads(how, model, tmp_path,
                                                                                      monkeypatch, caplog):
    """`generate --semantic auto` names --segment-model (not segment's --model), the data path
    data.segment_model; a path that does not exist is 'no such folder', never `hf download <path>`; no
    line says maps are made or cached before the segmenter has loaded."""
    import logging

    caplog.set_level(logging.INFO)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "facebook/mask2former-swin-large-coco-panoptic" if model == "hub id" else str(tmp_path / "nowhere")
    root = tmp_path / "pairs"
    for kind in ("visible", "infrared"):
        (root / kind).mkdir(parents=True)
    smooth(32, 32).save(root / "visible" / "a.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "infrared" / "a.png")
    with pytest.raises(Vis2IRError) as err:
        if how == "generate":
            run_generate(root / "visible", tmp_path / "ir", checkpoint=DEMO_CHECKPOINT, semantic="auto",
                         segment_model=name, device="cpu")
        else:
            cfg = load_config(None, [f"data.source={root}", "data.size=32", "data.val_fraction=0",
                                     "data.test_fraction=0", "data.semantic_source=auto", f"data.segment_model={name}"])
            build_dataset(cfg.data, "train", require_semantic=True)
    message = str(err.value)
    setting = "--segment-model" if how == "generate" else "data.segment_model"
    assert f"({setting})" in message and "(--model" not in message and "--model /path" not in message
    if model == "missing path":
        assert "no such folder" in message and "hf download" not in message
    assert "cached in" not in caplog.text and "made with" not in caplog.text
