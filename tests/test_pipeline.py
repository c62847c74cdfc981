"""The Python API and `vis2ir generate`: sizes, batches, files, errors, offload, several processes."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from vis2ir.checkpoint import ADAPTER_FILE, add_lora, load_checkpoint_config, save_weights
from vis2ir.cli import main
from vis2ir.config import load_config
from vis2ir.palette import colourise
from vis2ir.errors import Vis2IRError
from vis2ir.model import build_model
from vis2ir.io.images import to_tensor
from vis2ir.io.inputs import list_inputs
from vis2ir.io.runtime import default_device, dist_env, shard
from vis2ir.generate import run_generate
from vis2ir.pipeline import Vis2IRPipeline, batches, model_size
from vis2ir.speedup import LinearGELU

from tests.conftest import TINY_MODEL


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("prompt_cache")


def config(cache, *overrides):
    return load_config(None, [*TINY_MODEL, f"model.prompt_cache_dir={cache}", "model.codec=pixel",
                              "sample.steps=2", "sample.guidance=1.0", *overrides])


@pytest.fixture(scope="module")
def config_file(cache, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "none.yaml"
    config(cache, "model.semantic.mode=none").save(path)
    return path


@pytest.fixture(scope="module")
def pipe(cache):
    return Vis2IRPipeline.from_config(config(cache, "model.semantic.mode=none"), device="cpu")


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def noise_image(h, w, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Pure helpers


def test_to_tensor_accepts_the_usual_image_types():
    rgb = noise_image(5, 7)
    ref = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    for image in (Image.fromarray(rgb), rgb, ref, torch.from_numpy(rgb).permute(2, 0, 1)):
        assert torch.allclose(to_tensor(image), ref)
    deep = np.full((4, 6), 65535, np.uint16)
    assert torch.equal(to_tensor(deep), torch.ones(3, 4, 6))
    assert torch.equal(to_tensor(Image.fromarray(deep)), torch.ones(3, 4, 6))
    assert to_tensor(np.zeros((4, 6, 4), np.uint8)).shape == (3, 4, 6)  # alpha dropped
    with pytest.raises(Vis2IRError, match="expected a PIL image"):
        to_tensor("scene.png")
    with pytest.raises(Vis2IRError, match="got shape"):
        to_tensor(torch.zeros(2, 4, 4))


def test_model_size_rounds_to_the_patch():
    assert model_size(512, 640, 16) == (512, 640)
    assert model_size(500, 7, 16) == (496, 16)
    assert model_size(1024, 768, 16, size=512) == (512, 384)


def test_batches_keep_order_and_group_equal_sizes():
    sizes = [(8, 8), (8, 8), (8, 8), (16, 8), (8, 8), (8, 8)]
    assert batches(sizes, 2) == [[0, 1], [2], [3], [4, 5]]
    assert batches(sizes, 1) == [[i] for i in range(6)]


@pytest.mark.parametrize("count", [0, 1, 7, 10])
def test_shards_cover_every_item_once(count):
    items = [f"img{i}" for i in range(count)]
    for world in (1, 2, 3, 4, 16):
        shares = [shard(items, rank, world) for rank in range(world)]
        flat = [x for s in shares for x in s]
        assert sorted(flat) == sorted(items) and len(flat) == len(set(flat))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("local", ["x", "-1", "2"])
def test_a_local_rank_naming_no_device_is_one_line(monkeypatch, local):
    """LOCAL_RANK picks the default CUDA device; one that is not an integer or names no device is refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", local)
    with pytest.raises(Vis2IRError, match=rf"^LOCAL_RANK='{local}': expected an integer from 0 to 1 "):
        default_device()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert default_device() == torch.device("cuda", 1)


def test_dist_env(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist_env() == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert dist_env() == (2, 4)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(Vis2IRError, match="RANK=4"):
        dist_env()


def test_list_inputs(tmp_path):
    save(tmp_path / "in" / "a.png", noise_image(8, 8))
    save(tmp_path / "in" / "b.jpg", noise_image(8, 8))
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    save(tmp_path / "sem" / "a.png", noise_image(8, 8))
    items = list_inputs(tmp_path / "in", tmp_path / "sem")
    assert [(i.name, i.semantic and i.semantic.name) for i in items] == [("a", "a.png"), ("b", None)]
    assert items[1].problem.startswith("no semantic map named b.*")
    save(tmp_path / "in" / "a.jpg", noise_image(8, 8))
    with pytest.raises(Vis2IRError, match="would both write a.png"):
        list_inputs(tmp_path / "in")
    with pytest.raises(Vis2IRError, match="--input .*missing: no such file"):
        list_inputs(tmp_path / "missing")
    # --semantic auto: maps cached in semantic_auto/ beside the inputs (made later, tests/test_segment.py)
    assert list_inputs(tmp_path / "in" / "b.jpg", "auto")[0].semantic == tmp_path / "in" / "semantic_auto" / "b.png"


# ----------------------------------------------------------------------------------------------
# The API


def test_any_size_in_the_same_size_out(pipe):
    images = [noise_image(20, 37), noise_image(20, 37, 1), noise_image(64, 48)]
    out = pipe(images, batch_size=2, seed=1)
    assert [im.size for im in out.images] == [(37, 20), (37, 20), (48, 64)]
    assert all(im.mode == "L" for im in out.images)
    arrays = pipe(images[0], seed=1, output_type="np").images
    assert arrays[0].shape == (20, 37) and arrays[0].dtype == np.float32
    assert np.abs(arrays[0] * 255 - np.asarray(out.images[0])).max() <= 0.5 + 1e-3  # same image, batch or not


def test_semantic_maps_are_required_when_the_mode_needs_them(cache):
    pipe = Vis2IRPipeline.from_config(config(cache, "model.semantic.mode=cross_attention"), device="cpu")
    with pytest.raises(Vis2IRError, match="mode=cross_attention needs a semantic map"):
        pipe(noise_image(16, 16))
    with pytest.raises(Vis2IRError, match="2 visible images but 1 semantic"):
        pipe([noise_image(16, 16)] * 2, [noise_image(16, 16)])
    plain = Vis2IRPipeline.from_config(config(cache, "model.semantic.mode=none"), device="cpu")
    with pytest.raises(Vis2IRError, match="attention maps need model.semantic.mode=cross_attention"):
        plain(noise_image(16, 16), return_attention=True)


@pytest.mark.parametrize("how", ["model", "sequential"])
def test_cpu_offload_gives_the_same_images(cache, how):
    cfg = config(cache, "model.codec=vae", "model.semantic.mode=none")  # a VAE: offloaded too
    model = build_model(cfg)
    image = noise_image(32, 32)
    reference = Vis2IRPipeline(copy.deepcopy(model), cfg)(image, output_type="pt").images[0]
    offloaded = Vis2IRPipeline(model, cfg, device="cpu").offload(how)
    assert torch.allclose(offloaded(image, output_type="pt").images[0], reference, atol=1e-6)
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    # sequential: diffusers' group offloading, layer by layer (accelerate's cpu_offload was 6x slower on an H200)
    assert _is_group_offload_enabled(model.transformer) == _is_group_offload_enabled(model.codec.vae) == (
        how == "sequential")


@pytest.fixture(scope="module")
def checkpoint(cache, tmp_path_factory):
    # data.size: the 16-pixel test images are generated at 16 (sample.size=auto), not at the default 512
    cfg = config(cache, "model.semantic.mode=cross_attention", "model.semantic.num_heads=4", "model.lora.rank=2",
                 "data.size=16")
    model = build_model(cfg)
    add_lora(model.transformer, cfg.model.lora)
    path = tmp_path_factory.mktemp("run") / "step-1"
    save_weights(path, model, cfg)
    return path


def test_checkpoint_settings_must_match(checkpoint, cache, tmp_path):
    pipe = Vis2IRPipeline.from_checkpoint(checkpoint, device="cpu", overrides=["sample.steps=3"])
    assert pipe.cfg.sample.steps == 3 and pipe.model.adapter is not None
    with pytest.raises(Vis2IRError, match=r"model.semantic.mode='none' differs from the checkpoint's "
                                          r"'cross_attention' \(.*config.yaml\)"):
        Vis2IRPipeline.from_checkpoint(checkpoint, overrides=["model.semantic.mode=none"])
    other = tmp_path / "other.yaml"
    config(cache, "model.codec=vae", "model.semantic.mode=cross_attention").save(other)
    with pytest.raises(Vis2IRError, match=f"config {other}: model.codec='vae' differs"):
        Vis2IRPipeline.from_checkpoint(checkpoint, config=other)


@pytest.fixture(scope="module")
def trained_lora(cache, tmp_path_factory):
    """A checkpoint whose LoRA changes the output (peft initialises B to zero)."""
    cfg = config(cache, "model.semantic.mode=none", "model.lora.rank=4", "data.size=32")  # the test images' size
    model = build_model(cfg)
    add_lora(model.transformer, cfg.model.lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("lora") / "step-1"
    save_weights(path, model, cfg)
    return path


def test_loaded_models_are_fused_for_sampling_and_give_the_same_images(trained_lora):
    """`sample.fuse` (on by default): the LoRA is merged and each attention's q/k/v is one matmul; same images."""
    image = noise_image(32, 32)
    fused = Vis2IRPipeline.from_checkpoint(trained_lora, device="cpu")
    plain = Vis2IRPipeline.from_checkpoint(trained_lora, device="cpu", overrides=["sample.fuse=false"])
    t_fused, t_plain = fused.model.transformer, plain.model.transformer
    assert not any("lora" in name for name, _ in t_fused.named_parameters())
    assert any("lora_B" in name for name, _ in t_plain.named_parameters())
    attention = t_fused.transformer_blocks[0].attn
    assert attention.fused_projections and hasattr(attention, "to_qkv") and hasattr(attention, "to_added_qkv")
    assert not any(hasattr(attention, name) for name in ("to_q", "to_k", "to_v", "add_q_proj"))
    assert t_fused.single_transformer_blocks[0].attn.fused_projections
    assert isinstance(t_fused.transformer_blocks[0].ff.net[0], LinearGELU)  # the GELU inside its product
    assert isinstance(t_fused.single_transformer_blocks[0].proj_mlp, LinearGELU)
    assert sum(p.numel() for p in t_fused.parameters()) < sum(p.numel() for p in t_plain.parameters())
    a = fused(image, output_type="pt").images[0]
    b = plain(image, output_type="pt").images[0]
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    # the LoRA matters here, so the comparison means something
    no_lora = Vis2IRPipeline.from_config(load_checkpoint_config(trained_lora), device="cpu")
    assert (no_lora(image, output_type="pt").images[0] - a).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_a_checkpoint_saved_with_a_retired_compile_mode_still_loads(checkpoint, tmp_path, caplog, mode):
    """Older vis2ir saved sample.compile_mode values it now refuses (CUDA graphs); such a checkpoint (and its run,
    for --resume) loads with `default` and a warning, while typing the value is still refused."""
    import shutil

    import yaml

    old = tmp_path / "old"
    shutil.copytree(checkpoint, old)
    settings = yaml.safe_load((old / "config.yaml").read_text())
    settings.setdefault("sample", {})["compile_mode"] = mode
    (old / "config.yaml").write_text(yaml.safe_dump(settings))
    with caplog.at_level("WARNING", logger="vis2ir.config"):
        pipe = Vis2IRPipeline.from_checkpoint(old, device="cpu")
    assert pipe.cfg.sample.compile_mode == "default"
    assert f"sample.compile_mode={mode} is no longer offered" in caplog.text and str(old) in caplog.text
    with pytest.raises(Vis2IRError, match="sample.compile_mode"):
        Vis2IRPipeline.from_checkpoint(old, device="cpu", overrides=[f"sample.compile_mode={mode}"])


def test_missing_adapter_file(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in checkpoint.iterdir():
        if f.name != ADAPTER_FILE:
            (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(Vis2IRError, match=f"{ADAPTER_FILE}: is missing, so {broken} is not a whole checkpoint"):
        Vis2IRPipeline.from_checkpoint(broken)


# ----------------------------------------------------------------------------------------------
# The command


def run(*argv):
    return main(["generate", *map(str, argv)])


def test_generate_folder(config_file, tmp_path, caplog, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    save(src / "a.png", noise_image(24, 40))
    save(src / "b.png", noise_image(32, 32, 1))
    save(src / "c.jpg", noise_image(32, 32, 2))
    (src / "broken.png").write_bytes(b"not a png")
    assert run("--config", config_file, "--input", src, "--out", out, "--batch-size", 2, "--compare") == 2
    assert "broken.png: cannot read image (" in caplog.text  # reported when met (the one reader's wording) …
    assert "vis2ir: error: 1 of 4 inputs failed: broken (" in capsys.readouterr().err  # … and summed up at the end
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png", "c.png"]
    a = Image.open(out / "a.png")
    assert a.mode == "L" and a.size == (40, 24)
    compare = Image.open(out / "compare" / "b.png")  # visible | generated, each drawn 256 px, labelled
    assert compare.size[0] > 2 * 256 and 256 < compare.size[1] < 2 * 256
    assert not list(out.rglob(".*"))  # no temporary files left behind

    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    (src / "broken.png").unlink()
    assert run("--config", config_file, "--input", src, "--out", out) == 0  # all exist: skipped
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before
    assert run("--config", config_file, "--input", src / "b.png", "--out", out, "--overwrite", "--bit-depth", 16,
               "--palette", "black-hot") == 0
    deep = np.asarray(Image.open(out / "b.png"))
    assert deep.dtype == np.uint16 and deep.max() > 255
    assert run("--config", config_file, "--input", src / "c.jpg", "--out", out, "--overwrite",
               "--palette", "ironbow") == 0
    assert Image.open(out / "c.png").mode == "RGB"
    assert run("--config", config_file, "--input", src, "--out", out, "--bit-depth", 16, "--palette", "ironbow") == 2


def test_compare_shows_the_truth_when_it_is_known(config_file, tmp_path, monkeypatch):
    """`generate --compare --truth DIR`: the compare picture labels its panels and adds the truth of the
    inputs that have one (named like them, at the output's size); the others show no truth panel."""
    import vis2ir.generate as runner

    shown = {}
    original = runner.compare_figure
    monkeypatch.setattr(runner, "compare_figure",
                        lambda panels, title: shown.setdefault(title.split(":")[0], panels) and original(panels, title))
    src, out = tmp_path / "in", tmp_path / "out"
    save(src / "a.png", noise_image(32, 32))
    save(src / "b.png", noise_image(32, 32, 1))
    truth = np.full((64, 64), 200, np.uint8)  # twice the size: shown at the output's
    save(tmp_path / "truth" / "a.png", truth)
    assert run("--config", config_file, "--input", src, "--out", out, "--compare", "--truth", tmp_path / "truth") == 0
    assert list(shown["a"]) == ["visible", "generated infrared (white-hot)", "truth (white-hot)"]
    assert shown["a"]["truth (white-hot)"].shape == (32, 32) and (shown["a"]["truth (white-hot)"] == 200).all()
    assert list(shown["b"]) == ["visible", "generated infrared (white-hot)"]
    assert (out / "compare" / "a.png").exists() and (out / "compare" / "b.png").exists()
    assert run("--config", config_file, "--input", src, "--out", tmp_path / "o2", "--compare",
               "--truth", tmp_path / "nowhere") == 2


def test_generate_errors_are_one_line(checkpoint, tmp_path, capsys):
    src = tmp_path / "in"
    save(src / "a.png", noise_image(16, 16))
    save(src / "b.png", noise_image(16, 16))
    save(tmp_path / "sem" / "a.png", colourise(np.arange(256).reshape(16, 16) % 133))  # palette colours
    assert run("--checkpoint", checkpoint, "--input", src, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    # The three ways out; for a checkpoint (its mode is fixed) mode none means another model (it said
    # "or use model.semantic.mode=none", which this checkpoint cannot do).
    assert len(err) == 1 and err[0].startswith(
        "vis2ir: error: model.semantic.mode=cross_attention needs semantic maps: pass --semantic FILE|DIR (maps "
        f"named like the inputs); make them with `vis2ir segment --input {src} --out {src}_semantic`, or "
        "pass --semantic auto (")
    assert err[0].count("--boxes PATH") == 1 and err[0].endswith("a model trained with train.semantic_dropout > 0, "
                                                                 "which generates without maps")
    assert "use a model trained with model.semantic.mode=none (this checkpoint was trained with" in err[0]
    assert run("--checkpoint", checkpoint, "--input", src, "--semantic", tmp_path / "sem", "--out",
               tmp_path / "out", "--save-attention") == 2  # b has no map: reported, a is done
    err = capsys.readouterr().err
    assert "1 of 2 inputs failed: b (" in err and "for the missing semantic maps: make them with `vis2ir segment" in err
    assert (tmp_path / "out" / "a.png").exists() and not (tmp_path / "out" / "b.png").exists()
    assert (tmp_path / "out" / "attention" / "a" / "point0.png").exists()


def test_processes_split_the_folder(config_file, tmp_path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    names = [f"img{i}" for i in range(5)]
    for i, name in enumerate(names):
        save(src / f"{name}.png", noise_image(16, 16, i))
    done = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        done.append(run_generate(src, out, config=config_file).done)
    assert sorted(done[0] + done[1]) == names and not set(done[0]) & set(done[1])
    assert sorted(p.stem for p in out.glob("*.png")) == names


@pytest.mark.parametrize("mode", ["none", "pixel_fusion", "cross_attention", "in_context", "channel_concat"])
def test_every_mode_generates(cache, mode):
    pipe = Vis2IRPipeline.from_config(config(cache, f"model.semantic.mode={mode}"), device="cpu")
    out = pipe([noise_image(24, 16), noise_image(24, 16, 1)], [noise_image(24, 16, 2)] * 2, batch_size=2, steps=1,
               output_type="np")
    assert [im.shape for im in out.images] == [(24, 16)] * 2
    assert all(np.isfinite(im).all() and 0 <= im.min() <= im.max() <= 1 for im in out.images)


def test_generate_recursive_mirrors_the_sub_folders(config_file, tmp_path, capsys):
    """`--recursive`: the images of split folders, outputs in the same sub-folders (kept inside --out);
    an output folder inside the input is not read back as input."""
    src = tmp_path / "in"
    save(src / "train" / "a.png", noise_image(16, 16))
    save(src / "test" / "a.png", noise_image(16, 16, 1))  # the same file name in two splits
    save(src / "top.png", noise_image(16, 16, 2))
    save(tmp_path / "splits" / "train" / "x.png", noise_image(16, 16, 3))
    assert run("--config", config_file, "--input", tmp_path / "splits", "--out", tmp_path / "o") == 2
    assert "(it has sub-folders: --recursive takes their images too)" in capsys.readouterr().err
    out = src / "ir"
    assert run("--config", config_file, "--input", src, "--out", out, "--recursive", "--compare") == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "compare/test/a.png", "compare/top.png", "compare/train/a.png", "test/a.png", "top.png", "train/a.png"]
    assert run("--config", config_file, "--input", src, "--out", out, "--recursive") == 0  # all done: skipped
    assert not (out / "ir").exists()
    items = list_inputs(src, recursive=True, exclude=(out,))
    assert [it.name for it in items] == ["test/a", "top", "train/a"]
    save(tmp_path / "maps" / "train" / "a.png", noise_image(16, 16))
    by_name = {it.name: it for it in list_inputs(src, tmp_path / "maps", recursive=True, exclude=(out,))}
    assert by_name["train/a"].semantic == tmp_path / "maps" / "train" / "a.png"
    assert by_name["test/a"].semantic is None and "no semantic map named test/a.*" in by_name["test/a"].problem


def test_recursive_inputs_pair_with_their_own_truth_and_map(config_file, tmp_path, monkeypatch, caplog):
    """`generate --recursive --compare --truth DIR --semantic DIR`: an input in a sub-folder goes with the
    truth and the map at the same relative path (any image suffix), so same-named inputs of two splits each
    get their own; a flat folder is matched by bare name when that is unambiguous, and reported when not."""
    import vis2ir.generate as runner

    shown = {}
    original = runner.compare_figure
    monkeypatch.setattr(runner, "compare_figure",
                        lambda panels, title: shown.setdefault(title.split(":")[0], panels) and original(panels, title))
    src = tmp_path / "in"
    for k, name in enumerate(("train/a", "test/a", "top")):
        save(src / f"{name}.png", noise_image(16, 16, k))
    levels = {"train/a": 50, "test/a": 200, "top": 120}
    for name, level in levels.items():
        save(tmp_path / "truth" / f"{name}.{'jpg' if name == 'test/a' else 'png'}", np.full((16, 16), level, np.uint8))
        save(tmp_path / "maps" / f"{name}.png", np.full((16, 16, 3), level, np.uint8))
    assert run("--config", config_file, "--input", src, "--out", tmp_path / "out", "--recursive", "--compare",
               "--truth", tmp_path / "truth") == 0
    for name, level in levels.items():
        truth = shown[name]["truth (white-hot)"]
        assert abs(int(np.median(truth)) - level) <= 2, name  # its own truth (the JPEG within its rounding)
    by_name = {it.name: it for it in list_inputs(src, tmp_path / "maps", recursive=True)}
    assert {n: it.semantic.relative_to(tmp_path / "maps").as_posix() for n, it in by_name.items()} == {
        "train/a": "train/a.png", "test/a": "test/a.png", "top": "top.png"}

    # A flat folder of truths and maps: the bare name, when one input has it ...
    save(src / "sub" / "b.png", noise_image(16, 16, 5))
    save(tmp_path / "flat" / "b.png", np.full((16, 16), 90, np.uint8))
    save(tmp_path / "flat" / "a.png", np.full((16, 16), 30, np.uint8))
    shown.clear()
    assert run("--config", config_file, "--input", src, "--out", tmp_path / "out2", "--recursive", "--compare",
               "--truth", tmp_path / "flat") == 0
    assert (shown["sub/b"]["truth (white-hot)"] == 90).all()
    # ... but a.png would go with train/a and test/a: neither gets it, and the log says why
    assert list(shown["train/a"]) == list(shown["test/a"]) == ["visible", "generated infrared (white-hot)"]
    assert "a.* there would go with 2 inputs (test/a, train/a)" in caplog.text
    by_name = {it.name: it for it in list_inputs(src, tmp_path / "flat", recursive=True)}
    assert by_name["sub/b"].semantic == tmp_path / "flat" / "b.png" and by_name["sub/b"].problem is None
    assert by_name["train/a"].semantic is None and "would go with 2 inputs" in by_name["train/a"].problem
    assert by_name["top"].semantic is None and by_name["top"].problem.startswith("no semantic map named top.*")


def test_match_partners_prefers_the_same_suffix_and_reports_ambiguity(tmp_path):
    """Several files of one name: the input's own suffix wins; without it, the name is ambiguous."""
    from vis2ir.io.inputs import match_partners

    for name in ("x.png", "x.jpg", "y.png", "y.jpg"):
        save(tmp_path / "maps" / name, noise_image(8, 8))
    found = match_partners({"x": tmp_path / "in" / "x.jpg", "y": tmp_path / "in" / "y.tif", "z": None},
                           tmp_path / "maps", "semantic map")
    assert found.found == {"x": tmp_path / "maps" / "x.jpg"}
    assert found.problem("y") == f"several semantic maps named y.* in {tmp_path / 'maps'} (y.jpg, y.png): keep one"
    assert found.missing == ["z"] and found.problem("z") == f"no semantic map named z.* in {tmp_path / 'maps'}"



def test_match_partners_reads_each_name_once_on_large_runs(tmp_path):
    """No search over every name per name (50k KAIST frames in a flat map folder, where each bare name is shared,
    took minutes): the names are iterated once, and `problem` looks a name up in a set, not the `missing` list."""
    from vis2ir.io.inputs import match_partners

    class Names(dict):
        iterations = 0

        def __iter__(self):
            Names.iterations += 1
            return super().__iter__()

    class Missing(list):
        searched = 0

        def __contains__(self, item):
            Missing.searched += 1
            return super().__contains__(item)

    for k in range(20):
        save(tmp_path / "maps" / f"{k:03d}.png", noise_image(4, 4))
    names = Names({f"set{s}/V000/{k:03d}": None for s in range(2) for k in range(40)})
    found = match_partners(names, tmp_path / "maps", "semantic map", recursive=True)
    assert len(found.ambiguous) == 40 and len(found.missing) == 40 and Names.iterations <= 1
    assert "would go with 2 inputs (set0/V000/007, set1/V000/007)" in found.problem("set1/V000/007")
    found.missing = Missing(found.missing)
    assert all(found.problem(n) for n in names) and Missing.searched == 0

def test_a_truth_file_goes_with_a_single_input(config_file, tmp_path, monkeypatch, capsys):
    """`--truth FILE` goes with a single `--input FILE` whatever its name (as `--semantic FILE` does); with a
    folder of inputs it is one line saying to pass a folder."""
    import vis2ir.generate as runner

    shown = {}
    original = runner.compare_figure
    monkeypatch.setattr(runner, "compare_figure",
                        lambda panels, title: shown.setdefault(title.split(":")[0], panels) and original(panels, title))
    photo = save(tmp_path / "in" / "scene.png", noise_image(16, 16))
    truth = save(tmp_path / "scene_ir.png", np.full((16, 16), 77, np.uint8))
    assert run("--config", config_file, "--input", photo, "--out", tmp_path / "out", "--compare", "--truth", truth) == 0
    assert (shown["scene"]["truth (white-hot)"] == 77).all()
    assert run("--config", config_file, "--input", tmp_path / "in", "--out", tmp_path / "o2", "--compare",
               "--truth", truth) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"vis2ir: error: --truth {truth}: a single file goes with a single --input file; pass a "
                       "folder of true infrared images named like the inputs")
