import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from vis2ir.checkpoint import (ADAPTER_FILE, LORA_FILE, PROMPT_FILE, TRANSFORMER_FILE, add_lora, find_checkpoint,
                               load_model, save_weights, write_manifest)
from vis2ir.errors import Vis2IRError
from vis2ir.model import build_model

from tests.conftest import stock_pipeline_outputs


def perturb(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def inputs(size=32):
    g = torch.Generator().manual_seed(1)
    vis, ir, sem = (torch.rand(1, 3, size, size, generator=g) for _ in range(3))
    return vis, ir, sem, torch.tensor([0.4]), torch.randn(1, (size // 16) ** 2 * 2, 64, generator=g)


@pytest.mark.parametrize("mode", ["cross_attention", "channel_concat"])
def test_lora_and_adapter_round_trip(tiny_config, tmp_path, mode):
    cfg = tiny_config(f"model.semantic.mode={mode}", "model.lora.rank=4")
    model = build_model(cfg)
    add_lora(model.transformer, cfg.model.lora)
    perturb(model.transformer)
    if model.adapter is not None:
        perturb(model.adapter, 1)
    with torch.no_grad():  # the prompt embeddings travel with the checkpoint too
        model.prompt_embeds.add_(0.5)
        model.pooled_prompt_embeds.mul_(-1)
    run = tmp_path / "run"
    save_weights(run / "checkpoints" / "step-3", model, cfg)
    save_weights(run / "checkpoints" / "step-10", model, cfg)
    assert find_checkpoint(run).name == "step-10"
    loaded, cfg2 = load_model(run)
    assert cfg2 == cfg
    vis, ir, sem, t, noise = inputs()
    with torch.no_grad():
        assert torch.allclose(model.eval()(vis, ir, sem, t, noise).pred, loaded(vis, ir, sem, t, noise).pred, atol=1e-5)


def test_stock_pipeline_loads_the_lora(tiny_config, tmp_path):
    """A stock FluxFillPipeline.load_lora_weights(dir) loads our LoRA file and its output changes."""
    cfg = tiny_config("model.semantic.mode=none", "model.lora.rank=4")
    model = build_model(cfg)
    base = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    add_lora(model.transformer, cfg.model.lora)
    perturb(model.transformer)
    save_weights(tmp_path / "ckpt", model, cfg)
    assert (tmp_path / "ckpt" / LORA_FILE).exists() and not (tmp_path / "ckpt" / ADAPTER_FILE).exists()

    fresh = build_model(cfg).transformer
    fresh.load_state_dict(base)
    before, after, ours = stock_pipeline_outputs(fresh, tmp_path / "ckpt", model.transformer)
    assert not torch.allclose(before, after, atol=1e-4)
    assert torch.allclose(after, ours, atol=1e-5)


def test_missing_adapter_file_is_a_clear_error(tiny_config, tmp_path):
    cfg = tiny_config("model.semantic.mode=cross_attention", "model.lora.rank=4")
    model = build_model(cfg)
    add_lora(model.transformer, cfg.model.lora)
    save_weights(tmp_path / "c", model, cfg)
    (tmp_path / "c" / ADAPTER_FILE).unlink()
    with pytest.raises(Vis2IRError, match="adapter.safetensors: is missing, so .* is not a whole checkpoint"):
        load_model(tmp_path / "c")
    with pytest.raises(Vis2IRError, match="no checkpoint here"):
        load_model(tmp_path / "nothing")


def test_full_finetune_round_trip(tiny_config, tmp_path):
    cfg = tiny_config("model.semantic.mode=none", "train.finetune=full")
    model = build_model(cfg)
    perturb(model.transformer)
    save_weights(tmp_path / "c", model, cfg)
    loaded, _ = load_model(tmp_path / "c")
    assert all(torch.equal(a, b) for a, b in zip(model.transformer.state_dict().values(),
                                                   loaded.transformer.state_dict().values()))


def _edit(path, change):
    """Rewrite a safetensors file with `change(tensors)` applied, keeping its metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)
    write_manifest(path.parent)  # a whole file that does not fit, not one copied incompletely


def _drop_half(t):
    for k in sorted(t)[::2]:
        del t[k]


def _first_to(t, shape):
    k = sorted(t)[0]
    t[k] = torch.zeros(shape)


@pytest.mark.parametrize("finetune, file, change, problem", [
    ("lora", LORA_FILE, _drop_half, r"13 of 26 tensors missing, e\.g\. transformer\."),
    ("lora", LORA_FILE, lambda t: t.update(extra=torch.zeros(2)), r"1 unexpected, e\.g\. extra"),
    ("lora", LORA_FILE, lambda t: _first_to(t, (3, 3)), r"1 of the wrong shape, e\.g\. transformer\..*: \[3, 3\] "),
    ("lora", ADAPTER_FILE, lambda t: t.pop(sorted(t)[0]), r"1 of \d+ tensors missing, e\.g\. layers\.0\."),
    ("lora", ADAPTER_FILE, lambda t: t.update(extra=torch.zeros(2)), r"1 unexpected, e\.g\. extra"),
    ("full", TRANSFORMER_FILE, lambda t: t.pop(sorted(t)[-1]), r"1 of \d+ tensors missing"),
    ("full", TRANSFORMER_FILE, lambda t: _first_to(t, (1,)), r"1 of the wrong shape"),
    ("lora", PROMPT_FILE, lambda t: t.pop("pooled_prompt_embeds"), r"1 of 2 tensors missing, e\.g\. pooled_prompt"),
], ids=["lora-missing", "lora-extra", "lora-shape", "adapter-missing", "adapter-extra", "full-missing",
        "full-shape", "prompt-missing"])
def test_a_file_that_does_not_fit_is_refused(tiny_config, tmp_path, finetune, file, change, problem):
    """Missing, extra or misshapen tensors: one line naming the file, never a silently different model."""
    cfg = tiny_config("model.semantic.mode=cross_attention", "model.lora.rank=4", f"train.finetune={finetune}")
    model = build_model(cfg)
    if finetune == "lora":
        add_lora(model.transformer, cfg.model.lora)
    save_weights(tmp_path / "c", model, cfg)
    _edit(tmp_path / "c" / file, change)
    with pytest.raises(Vis2IRError) as err:
        load_model(tmp_path / "c")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'c' / file}: does not fit the model built from its config (")
    assert re.search(problem, message) and "\n" not in message


# ----------------------------------------------------------------------------------------------
# train.init_from across train.finetune kinds (the shipped demo model is a full checkpoint)

ROOT = Path(__file__).resolve().parents[1]


def _finetune(tmp, name, *overrides):
    """A 2-step run of configs/finetune_demo.yaml (a small copy of the README's recipe) → (model as trained,
    run folder)."""
    import lightning as L

    from vis2ir.config import load_config
    from vis2ir.train import train

    kept = {}

    class Keep(L.Callback):
        def on_train_end(self, trainer, module):
            kept["model"] = module.model

    cfg = load_config(ROOT / "configs" / "finetune_demo.yaml", [
        f"train.output_dir={tmp / name}", f"model.prompt_cache_dir={tmp / 'prompts'}", "data.size=32",
        "data.synth_count=12", "data.val_fraction=0", "train.batch_size=2", "train.max_steps=2",
        "train.checkpoint_every=2", "train.val_batches=0", "train.learning_rate=1e-3", "model.lora.rank=4",
        *overrides])
    run = train(cfg, progress=False, callbacks=[Keep()])
    return kept["model"].eval(), run


def _predict(model):
    g = torch.Generator().manual_seed(3)
    vis, ir, sem = (torch.rand(1, 3, 32, 32, generator=g) for _ in range(3))
    with torch.no_grad():
        noise = torch.randn(model.encode(vis, ir, sem).x_0.shape, generator=g)
        return model(vis, ir, sem, torch.tensor([0.6]), noise).pred


@pytest.fixture(scope="module")
def lora_on_demo(tmp_path_factory):
    """LoRA fine-tuned from a copy of the shipped demo model (a full checkpoint), as trained."""
    from vis2ir.checkpoint import SHIPPED

    tmp = tmp_path_factory.mktemp("lora_on_demo")
    shutil.copytree(SHIPPED["demo"], tmp / "base")
    model, run = _finetune(tmp, "lora", "train.finetune=lora", f"train.init_from={tmp / 'base'}")
    return tmp, model, run


def test_lora_from_a_full_checkpoint_loads_back_on_it(lora_on_demo):
    """The LoRA records its base (the concrete folder, in config.yaml and base.json) and loads back on it:
    once it loaded on a random base (prediction error 0.0075 as trained, 0.238 as loaded)."""
    tmp, trained, run = lora_on_demo
    step = run / "checkpoints" / "step-2"
    assert (step / LORA_FILE).exists() and not (step / TRANSFORMER_FILE).exists()
    for config in (run / "config.yaml", step / "config.yaml"):
        assert yaml.safe_load(config.read_text())["train"]["init_from"] == str((tmp / "base").resolve())
    loaded, _ = load_model(run)
    torch.testing.assert_close(_predict(loaded), _predict(trained))


def test_shipped_demo_as_base_is_kept_by_name(tmp_path):
    """`train.init_from: demo` stays the shipped name; a LoRA on it loads back on the demo model."""
    trained, run = _finetune(tmp_path, "lora", "train.finetune=lora", "train.max_steps=1", "train.checkpoint_every=1")
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["init_from"] == "demo"
    loaded, _ = load_model(run)
    torch.testing.assert_close(_predict(loaded), _predict(trained))


def test_full_training_from_a_lora_checkpoint_merges_it(lora_on_demo, tmp_path):
    """train.finetune=full from a LoRA checkpoint starts from base + LoRA merged and writes whole weights that
    load_model loads (once it wrote peft's layer names, which load_model refused)."""
    from vis2ir.train import Vis2IRModule

    tmp, lora_model, lora_run = lora_on_demo
    cfg_overrides = ("train.finetune=full", f"train.init_from={lora_run}")
    trained, run = _finetune(tmp_path, "full", *cfg_overrides)
    step = run / "checkpoints" / "step-2"
    assert (step / TRANSFORMER_FILE).exists() and not (step / LORA_FILE).exists()
    assert yaml.safe_load((step / "config.yaml").read_text())["train"]["init_from"] == \
        str((lora_run / "checkpoints" / "step-2").resolve())
    loaded, _ = load_model(run)
    torch.testing.assert_close(_predict(loaded), _predict(trained))
    start = Vis2IRModule(load_model(run)[1])._build().eval()  # what the full run started from
    torch.testing.assert_close(_predict(start), _predict(lora_model))


def test_a_changed_or_gone_base_is_one_line(lora_on_demo, tmp_path):
    tmp, _, run = lora_on_demo
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    base = tmp / "base"
    saved = (base / PROMPT_FILE).read_bytes()
    try:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(base / PROMPT_FILE))
        save_file({k: v + 1 for k, v in tensors.items()}, str(base / PROMPT_FILE))
        step = re.escape(str(copy / "checkpoints" / "step-2"))
        with pytest.raises(Vis2IRError, match=rf"^{step}: trained on the checkpoint {re.escape(str(base.resolve()))} "
                                              r".*which has changed since"):
            load_model(copy)
        from vis2ir.train import resume_config, train

        with pytest.raises(Vis2IRError, match=r"^--resume .*which has changed since"):
            train(resume_config(str(copy), None, ["train.max_steps=4"]), resume=str(copy), progress=False)
        (base / PROMPT_FILE).write_bytes(saved)
        base.rename(tmp_path / "moved")
        with pytest.raises(Vis2IRError, match=r"trained on the checkpoint .*, which is gone; put it back"):
            load_model(copy)
    finally:
        if not base.exists():
            (tmp_path / "moved").rename(base)
        (base / PROMPT_FILE).write_bytes(saved)
    load_model(copy)  # the original back: it loads


def test_a_file_larger_than_recorded_is_called_edited_not_incomplete(tiny_config, tmp_path):
    """A file of a checkpoint that grew since files.json recorded it: "is N bytes, the checkpoint recorded M
    (edited or copied incompletely)"; once "is incomplete (304 of 303 bytes)". A shorter one is incomplete."""
    from vis2ir.checkpoint import check_intact

    cfg = tiny_config("model.semantic.mode=none", "train.finetune=full")
    save_weights(tmp_path / "c", build_model(cfg), cfg)
    prompt = tmp_path / "c" / PROMPT_FILE
    size = prompt.stat().st_size
    prompt.write_bytes(prompt.read_bytes() + b"\n")
    with pytest.raises(Vis2IRError, match=rf"^{re.escape(str(prompt))}: is {size + 1:,} bytes, the checkpoint "
                                          rf"recorded {size:,} \(edited or copied incompletely\), so "):
        check_intact(tmp_path / "c")
    prompt.write_bytes(prompt.read_bytes()[:-2])
    with pytest.raises(Vis2IRError, match=rf": is incomplete \({size - 1:,} of {size:,} bytes\), so "):
        check_intact(tmp_path / "c")


def test_a_lora_finds_its_base_after_its_runs_folder_moved_or_named_anew(lora_on_demo, tmp_path):
    """A runs folder moved or copied whole keeps its LoRAs working (base.json records the base relative to the
    checkpoint too); a base moved elsewhere is named with train.init_from=NEW_PLACE (generate, evaluate, app:
    `load_model(overrides=...)`), accepted only when it is the same checkpoint. Once: "which is gone; put it
    back", the override ignored."""
    from vis2ir.pipeline import Vis2IRPipeline
    from vis2ir.train import resume_config, train

    tmp, trained, run = lora_on_demo
    moved = tmp_path / "runs_moved"
    shutil.copytree(tmp / "base", moved / "base")
    shutil.copytree(run, moved / "lora")
    alone = tmp_path / "alone"
    shutil.copytree(run, alone)
    base = tmp / "base"
    base.rename(tmp_path / "away")
    try:
        torch.testing.assert_close(_predict(load_model(moved / "lora")[0]), _predict(trained))
        train(resume_config(str(moved / "lora"), None, ["train.max_steps=3"]), resume=str(moved / "lora"),
              progress=False)  # a resume finds it too, and so does its new checkpoint
        load_model(moved / "lora" / "checkpoints" / "step-3")
        with pytest.raises(Vis2IRError, match=r"which is gone; put it back where it was, or name its new place with "
                                              r"train.init_from=NEW_PLACE$"):
            load_model(alone)
        new_place = [f"train.init_from={moved / 'base'}"]
        torch.testing.assert_close(_predict(load_model(alone, overrides=new_place)[0]), _predict(trained))
        Vis2IRPipeline.from_checkpoint(alone, overrides=new_place)
        with pytest.raises(Vis2IRError, match=rf"which has changed since \({re.escape(str(alone))}/checkpoints/step-2 "
                                              r"is not it\); put the original back"):
            load_model(alone, overrides=[f"train.init_from={alone}"])  # another checkpoint: refused
    finally:
        (tmp_path / "away").rename(base)


def test_a_full_run_resumes_without_its_base(lora_on_demo, tmp_path):
    """A full checkpoint holds the whole transformer (and the prompt embeddings): resuming a full run trained
    from a LoRA run does not need that run, which its own keep_last pruning may delete; the resumed run continues
    exactly. Once: "trained on the checkpoint …/step-6 …, which is gone; put it back"."""
    from vis2ir.train import resume_config, train
    from safetensors.torch import load_file

    tmp, _, lora_run = lora_on_demo
    lora = tmp_path / "lora"
    shutil.copytree(lora_run, lora)
    full = ("train.finetune=full", f"train.init_from={lora}", "train.checkpoint_every=1")
    _, straight = _finetune(tmp_path, "straight", *full, "train.max_steps=3")
    _, run = _finetune(tmp_path, "full", *full)
    shutil.rmtree(lora)
    train(resume_config(str(run), None, ["train.max_steps=3"]), resume=str(run), progress=False)
    step = run / "checkpoints" / "step-3"
    torch.testing.assert_close(load_file(str(step / TRANSFORMER_FILE)),
                               load_file(str(straight / "checkpoints" / "step-3" / TRANSFORMER_FILE)))
    assert (step / "base.json").read_text() == (run / "checkpoints" / "step-2" / "base.json").read_text()
    load_model(run)
