"""`vis2ir evaluate` on folders and on a tiny checkpoint; `vis2ir ablate` on a 2-variant grid."""

import csv
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from vis2ir.cli import main
from vis2ir.palette import class_id, colourise
from vis2ir.errors import Vis2IRError
from vis2ir.evaluate.ablate import load_plan, make_variants, parse_grid, parse_shard, plan_variants, run_ablation, split_values
from vis2ir.evaluate.networks import ALEXNET_FILE, FID_FILE, AlexLPIPS, FIDInception
from vis2ir.evaluate.run import evaluate_checkpoint, evaluate_folders
from vis2ir.train import train

TINY_RUN = ["model.codec=pixel", "model.semantic.mode=channel_concat", "model.lora.rank=4", "data.size=32",
            "data.synth_count=24", "data.val_fraction=0.2", "data.test_fraction=0.2", "data.num_workers=0",
            "train.batch_size=2", "train.max_steps=2", "train.checkpoint_every=2", "train.val_every=100",
            "train.log_every=1", "sample.steps=2", "sample.guidance=1.0", "eval.fit_limit=8"]


@pytest.fixture(autouse=True)
def no_weights(tmp_path, monkeypatch):
    """No FID/LPIPS weights unless a test provides them."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for env in ("VIS2IR_FID_WEIGHTS", "VIS2IR_LPIPS_WEIGHTS"):
        monkeypatch.delenv(env, raising=False)


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_folders(tmp_path):
    """Truth 32×32: a hot person (204) on cold ground (51); the prediction is 10 levels off everywhere."""
    classes = np.full((32, 32), class_id("road"))
    classes[8:24, 8:16] = class_id("person")
    truth = np.where(classes == class_id("person"), 204, 51).astype(np.uint8)
    for name in ("a", "b"):
        save(tmp_path / "truth" / f"{name}.png", truth)
        save(tmp_path / "pred" / f"{name}.png", truth + 10)
        save(tmp_path / "sem" / f"{name}.png", colourise(classes))
    return tmp_path / "pred", tmp_path / "truth", tmp_path / "sem"


def test_evaluate_folders_writes_every_report(tmp_path):
    pred, truth, sem = make_folders(tmp_path)
    result = evaluate_folders(pred, truth, sem, out=tmp_path / "out")
    m = result["metrics"]
    assert m["psnr_native"] == pytest.approx(20 * np.log10(255 / 10), rel=1e-4)  # 28.13 dB
    assert m["fid"] is None and m["lpips"] is None
    assert "pt_inception-2015-12-05-6726825d.pth not found" in result["skipped"]["fid"]
    assert result["classes"]["person"]["abs_err"] == pytest.approx(10 / 255, rel=1e-4)
    assert result["classes"]["road"]["hallucinated_heat"] == 0.0
    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text())["images"] == 2
    rows = list(csv.DictReader((out / "per_class.csv").open()))
    assert {r["class"] for r in rows} == {"person", "road"}
    assert "| psnr |" in (out / "metrics.md").read_text() and "skipped" in (out / "metrics.md").read_text()
    assert Image.open(out / "per_class.png").size[0] > 100


def test_evaluate_folders_with_fid_and_lpips_weights(tmp_path, monkeypatch):
    """Weights files (random here) found through the environment: both metrics run, and are 0 for
    predictions equal to the truths."""
    pred, truth, _ = make_folders(tmp_path)
    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in AlexLPIPS().features.state_dict().items()}, tmp_path / ALEXNET_FILE)
    torch.save(FIDInception().state_dict(), tmp_path / FID_FILE)
    monkeypatch.setenv("VIS2IR_LPIPS_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("VIS2IR_FID_WEIGHTS", str(tmp_path / FID_FILE))
    result = evaluate_folders(pred, truth, out=tmp_path / "out")
    assert result["skipped"] == {} and result["classes"] == {}
    assert result["metrics"]["lpips"] > 0 and result["metrics"]["fid"] > 0
    same = evaluate_folders(truth, truth, out=tmp_path / "same")["metrics"]
    assert same["lpips"] == 0 and abs(same["fid"]) < 1e-6 * result["metrics"]["fid"]


def test_evaluate_folder_errors(tmp_path):
    pred, truth, sem = make_folders(tmp_path)
    (pred / "b.png").unlink()
    with pytest.raises(Vis2IRError, match=r"--pred .*: no image named like 1 of the 2 truth images, e.g. b\.\*"):
        evaluate_folders(pred, truth, sem, out=tmp_path / "out")
    assert main(["evaluate", "--pred", str(pred)]) == 2


def test_evaluate_recursive_pairs_each_truth_with_its_own_prediction(tmp_path, capsys):
    """`evaluate --recursive`: truths in split sub-folders with the same file names; each is paired with
    the prediction (and map) at its own relative path, so perfect predictions score as perfect. A flat
    folder of predictions pairs by bare name when that is unambiguous; otherwise one error says why."""
    classes = np.full((32, 32), class_id("road"))
    for split, level in (("train", 40), ("test", 200)):
        truth = np.full((32, 32), level, np.uint8)
        truth[:16] += 10
        save(tmp_path / "truth" / split / "a.png", truth)
        save(tmp_path / "pred" / split / "a.png", truth)
        save(tmp_path / "sem" / split / "a.png", colourise(classes))
    save(tmp_path / "pred" / "compare" / "a.png", np.zeros((32, 32), np.uint8))  # e.g. generate --compare's
    result = evaluate_folders(tmp_path / "pred", tmp_path / "truth", tmp_path / "sem", out=tmp_path / "out",
                              recursive=True)
    assert sorted(r["name"] for r in result["per_image"]) == ["test/a", "train/a"]
    assert result["metrics"]["psnr_native"] > 90 and result["classes"]["road"]["abs_err"] == 0
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"), "--recursive",
                 "--out", str(tmp_path / "cli")]) == 0
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"),
                 "--out", str(tmp_path / "flat")]) == 2  # the truths are in sub-folders: say so
    assert "no images in this folder (it has sub-folders: --recursive" in capsys.readouterr().err

    save(tmp_path / "flatpred" / "a.png", np.zeros((32, 32), np.uint8))  # one a.png for train/a and test/a
    with pytest.raises(Vis2IRError, match=r"--pred .*flatpred: 2 of the 2 truth images have no single image to go "
                                          r"with: .*a\.\* there would go with 2 inputs \(test/a, train/a\)"):
        evaluate_folders(tmp_path / "flatpred", tmp_path / "truth", out=tmp_path / "o2", recursive=True)
    (tmp_path / "truth" / "train" / "a.png").rename(tmp_path / "truth" / "train" / "b.png")
    save(tmp_path / "flatpred" / "b.png", np.zeros((32, 32), np.uint8))
    save(tmp_path / "flatpred" / "compare" / "b.png", np.zeros((32, 32), np.uint8))  # not a split: still flat
    result = evaluate_folders(tmp_path / "flatpred", tmp_path / "truth", out=tmp_path / "o3", recursive=True)
    assert sorted(r["name"] for r in result["per_image"]) == ["test/a", "train/b"]  # by bare name


def train_tiny(tiny_config, tmp_path, name="run"):
    cfg = tiny_config(*TINY_RUN, f"train.output_dir={tmp_path / name}")
    return train(cfg, progress=False)


def test_evaluate_checkpoint_generates_and_scores(tiny_config, tmp_path):
    run = train_tiny(tiny_config, tmp_path)
    result = evaluate_checkpoint(run, split="test", limit=3, out=tmp_path / "ev")
    assert result["images"] == 3 and len(list((tmp_path / "ev" / "pred").glob("*.png"))) == 3
    assert np.isfinite(result["metrics"]["psnr"]) and result["classes"]
    assert result["source"]["split"] == "test"
    # The command line gives the same numbers.
    assert main(["evaluate", "--checkpoint", str(run), "--limit", "3", "--out", str(tmp_path / "ev2")]) == 0
    again = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert again["metrics"]["psnr"] == pytest.approx(result["metrics"]["psnr"])


def test_noise_draws_average_the_seeds(tiny_config, tmp_path):
    """`eval.noise_draws=2` scores sample.seed and sample.seed + 1: its means are the two single-draw
    evaluations' means, and the per-draw figures are reported."""
    run = train_tiny(tiny_config, tmp_path)
    one = [evaluate_checkpoint(run, overrides=[f"sample.seed={s}"], split="test", limit=3, out=tmp_path / f"s{s}")
           for s in (3, 4)]
    both = evaluate_checkpoint(run, overrides=["sample.seed=3", "eval.noise_draws=2"], split="test", limit=3,
                               out=tmp_path / "both")
    assert one[0]["metrics"]["psnr"] != one[1]["metrics"]["psnr"]  # the draws differ
    assert both["images"] == 3 and both["draws"] == 2 and both["seeds"] == [3, 4]
    assert [d["psnr"] for d in both["per_draw"]] == pytest.approx([r["metrics"]["psnr"] for r in one])
    for key in ("psnr", "ssim"):
        assert both["metrics"][key] == pytest.approx(np.mean([r["metrics"][key] for r in one]))
    person = [r["classes"]["person"]["abs_err"] for r in one]
    assert both["classes"]["person"]["abs_err"] == pytest.approx(np.mean(person))
    assert "Means over 2 noise draws" in (tmp_path / "both" / "metrics.md").read_text()
    rows = list(csv.DictReader((tmp_path / "both" / "per_image.csv").open()))
    assert len(rows) == 6 and {r["draw"] for r in rows} == {"0", "1"}
    assert len(list((tmp_path / "both" / "pred").glob("*.png"))) == 3  # the first draw's pictures


def test_grid_parsing():
    assert split_values("a,[1,2],{x: 1, y: 2}") == ["a", "[1,2]", "{x: 1, y: 2}"]
    grid = parse_grid(["model.semantic.mode=none,in_context", "train.learning_rate=1e-3"])
    variants = make_variants(grid, [0, 1])
    assert [v.name for v in variants][:2] == ["mode=none__learning_rate=1e-3__seed=0",
                                              "mode=none__learning_rate=1e-3__seed=1"]
    assert len(variants) == 4 and variants[3].overrides[0] == "model.semantic.mode=in_context"
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(Vis2IRError, match="--shard '4/4'"):
        parse_shard("4/4")
    with pytest.raises(Vis2IRError, match="--grid 'mode'"):
        parse_grid(["mode"])


def test_plan_file(tmp_path):
    """A plan is a list of grids: modes alone, then one mode's settings; a row given twice runs once."""
    plan = tmp_path / "plan.yaml"
    plan.write_text("- {model.semantic.mode: [none, cross_attention]}\n"
                    "- model.semantic.mode: cross_attention\n  model.semantic.scale_init: [0.0, 0.1]\n"
                    "  model.semantic.dropout: 0.0\n"
                    "- {model.semantic.mode: [none]}\n")
    variants = plan_variants(load_plan(plan), [0])
    assert [v.group for v in variants] == ["mode=none", "mode=cross_attention",
                                           "mode=cross_attention__scale_init=0.0__dropout=0.0",
                                           "mode=cross_attention__scale_init=0.1__dropout=0.0"]
    assert variants[3].overrides[:3] == ["model.semantic.mode=cross_attention", "model.semantic.scale_init=0.1",
                                         "model.semantic.dropout=0.0"]
    plan.write_text("model.semantic.mode: none\n")
    with pytest.raises(Vis2IRError, match="--plan .*plan.yaml: expected a YAML list of mappings"):
        load_plan(plan)
    with pytest.raises(Vis2IRError, match="--plan .*missing.yaml: cannot read it"):
        load_plan(tmp_path / "missing.yaml")


def test_ablation_runs_resumes_and_collects(tiny_config, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vis2ir")
    base = tmp_path / "base.yaml"
    tiny_config(*TINY_RUN, "eval.limit=3").save(base)
    grid = ["model.semantic.mode=none,channel_concat"]
    # Two processes share the grid (--shard i/2), as two GPUs would.
    table = run_ablation(base, grid, seeds="0", out=tmp_path / "abl", shard="0/2", progress=False)
    assert "[1/1] mode=none__seed=0: PSNR" in caplog.text and "1 of 2 variants not finished" in table.read_text()
    run_ablation(base, grid, seeds="0", out=tmp_path / "abl", shard="1/2", progress=False)
    assert "[1/1] mode=channel_concat__seed=0: PSNR" in caplog.text and "Training channel_concat" in caplog.text
    text = table.read_text()
    assert "not finished" not in text
    for row in ("mode=none", "mode=channel_concat", "ref: class_oracle", "ref: visible_lookup", "ref: constant"):
        assert f"| {row} |" in text
    assert "abs_err/person" in text and "train_minutes" in text
    rows = {r["row"]: r for r in csv.DictReader((tmp_path / "abl" / "results.csv").open())}
    oracle, constant = float(rows["ref: class_oracle"]["psnr"]), float(rows["ref: constant"]["psnr"])
    assert oracle > constant  # the class-mean oracle beats a constant image
    assert (tmp_path / "abl" / "results.png").exists()
    from PIL import Image

    sheet = Image.open(tmp_path / "abl" / "samples.png")  # visible, semantic, truth + 2 rows of predictions
    assert 5 * 128 < sheet.height < 6 * 128 and sheet.width > 3 * 128  # tiles enlarged to 128 px, labelled
    caplog.clear()
    run_ablation(base, grid, seeds="0", out=tmp_path / "abl", progress=False)
    assert caplog.text.count("done already, skipped") == 2 and "Training" not in caplog.text
    # A variant trained but not evaluated (its result.json lost) is evaluated again, not retrained.
    caplog.clear()
    (tmp_path / "abl" / "variants" / "mode=none__seed=0" / "result.json").unlink()
    run_ablation(base, grid, seeds="0", out=tmp_path / "abl", progress=False)
    assert "[1/2] mode=none__seed=0: PSNR" in caplog.text and "Training" not in caplog.text
    (tmp_path / "abl" / "results.md").unlink()
    assert main(["ablate", "--config", str(base), "--grid", grid[0], "--out", str(tmp_path / "abl"), "--collect"]) == 0
    assert (tmp_path / "abl" / "results.md").read_text() == text
    (tmp_path / "plan.yaml").write_text("- {model.semantic.mode: [none, channel_concat]}\n")
    assert main(["ablate", "--config", str(base), "--plan", str(tmp_path / "plan.yaml"), "--out",
                 str(tmp_path / "abl"), "--collect"]) == 0
    assert (tmp_path / "abl" / "results.md").read_text() == text
    # Scoring overrides reach a variant trained before them; a table mixing draw counts says so.
    (tmp_path / "abl" / "variants" / "mode=none__seed=0" / "result.json").unlink()
    run_ablation(base, grid, seeds="0", out=tmp_path / "abl", overrides=["eval.noise_draws=2"], progress=False)
    again = json.loads((tmp_path / "abl" / "variants" / "mode=none__seed=0" / "result.json").read_text())
    assert again["noise_draws"] == 2 and again["images"] == 3
    assert "different eval.noise_draws ([1, 2])" in (tmp_path / "abl" / "results.md").read_text()


def test_cross_attention_variants_get_attention_pictures(tiny_config, tmp_path):
    base = tmp_path / "base.yaml"
    tiny_config(*TINY_RUN, "eval.limit=2").save(base)
    run_ablation(base, ["model.semantic.mode=cross_attention"], out=tmp_path / "abl", progress=False)
    scenes = sorted((tmp_path / "abl" / "variants" / "mode=cross_attention__seed=0" / "attention").iterdir())
    assert len(scenes) == 2
    for scene in scenes:
        assert {p.name for p in scene.iterdir()} == {"point0.png", "point0_heads.png", "classes.png", "classes.json"}
        assert json.loads((scene / "classes.json").read_text())  # attention per class region
    result = json.loads((tmp_path / "abl" / "variants" / "mode=cross_attention__seed=0" / "result.json").read_text())
    assert 0 < result["adapter_scale"] < 0.1  # from 0, two steps of at most ~lr each
    assert "adapter_scale" in (tmp_path / "abl" / "results.md").read_text()


def test_colour_predictions_are_flagged(tmp_path, caplog):
    """Palette images (e.g. ironbow) would be scored by their channel mean: the user is warned."""
    import logging

    import numpy as np
    from PIL import Image

    from vis2ir.evaluate.run import evaluate_folders, is_grey

    rng = np.random.default_rng(0)
    for folder in ("grey", "colour", "truth"):
        (tmp_path / folder).mkdir()
    grey = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "truth" / "a.png")
    Image.fromarray(grey).save(tmp_path / "grey" / "a.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "colour" / "a.png")
    caplog.set_level(logging.WARNING, logger="vis2ir")
    evaluate_folders(tmp_path / "grey", tmp_path / "truth", out=tmp_path / "o1")
    assert "in colour" not in caplog.text
    evaluate_folders(tmp_path / "colour", tmp_path / "truth", out=tmp_path / "o2")
    assert "1 predictions are in colour (first: a.png)" in caplog.text
    assert is_grey(torch.full((3, 4, 4), 0.5)) and not is_grey(torch.rand(3, 4, 4))


def test_ablate_gpus_script_shares_the_plan(tiny_config, tmp_path):
    """scripts/ablate_gpus.sh: GPUs × runs-per-GPU shards (one fake GPU here, two runs on it), then the table."""
    import os
    import stat
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: fake'\n")
    (fake / "nvidia-smi").chmod(stat.S_IRWXU)
    base = tmp_path / "base.yaml"
    tiny_config(*TINY_RUN, "eval.limit=2").save(base)
    (tmp_path / "plan.yaml").write_text("- {model.semantic.mode: [none, channel_concat]}\n")
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable,
           "PYTHONPATH": str(root / "src")}
    env.pop("OMP_NUM_THREADS", None)
    out = tmp_path / "abl"
    done = subprocess.run(["bash", str(root / "scripts" / "ablate_gpus.sh"), "2", "--config", str(base), "--plan",
                           str(tmp_path / "plan.yaml"), "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # each process: its share of the cores (nproc)
    assert f"2 processes on 1 GPUs ({threads} CPU threads each)" in done.stdout
    logs = {p.name: p.read_text() for p in (out / "logs").glob("shard-*.log")}
    assert "(shard 0/2)" in logs["shard-0.log"] and "(shard 1/2)" in logs["shard-1.log"]
    text = (out / "results.md").read_text()
    assert "| mode=none |" in text and "| mode=channel_concat |" in text and "not finished" not in text


def test_shipped_plans_make_valid_variants():
    """Every row of the shipped plans is a valid config on top of configs/ablation.yaml."""
    from pathlib import Path

    from vis2ir.config import load_config

    configs = Path(__file__).resolve().parents[2] / "configs"
    plans = sorted((configs / "plans").glob("*.yaml"))
    assert plans
    for plan in plans:
        variants = plan_variants(load_plan(plan), [0, 1])
        for v in variants:
            load_config(configs / "ablation.yaml", v.overrides)
    modes = plan_variants(load_plan(configs / "plans" / "ablation_modes.yaml"), [0])
    assert len(modes) == 8  # four modes + cross-attention × {none, rope} × {noisy, condition}


class LiveCounter:
    """Counts the samples (and predictions) alive at once: each is tracked by a finalizer on its tensor."""

    def __init__(self):
        self.alive, self.peak, self.made = 0, 0, 0

    def track(self, tensor):
        import weakref

        self.alive += 1
        self.made += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(tensor, self._gone)

    def _gone(self):
        self.alive -= 1


@pytest.fixture
def live_samples(monkeypatch):
    """Every dataset that `build_dataset` makes reports its samples' lifetimes to the counter."""
    import vis2ir.data

    counter = LiveCounter()
    real = vis2ir.data.build_dataset

    class Counted(torch.utils.data.Dataset):
        def __init__(self, dataset):
            self.dataset = dataset

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, i):
            sample = self.dataset[i]
            counter.track(sample["infrared"])
            return sample

    monkeypatch.setattr(vis2ir.data, "build_dataset", lambda *a, **kw: Counted(real(*a, **kw)))
    return counter


def test_evaluation_streams_the_split(tiny_config, tmp_path, live_samples, monkeypatch):
    """`evaluate --checkpoint` holds one batch of samples and predictions at a time, whatever the
    split's size (LLVIP's 3,463 test pairs at 512 px would be ~37 GiB held at once), also with several
    noise draws; the reference rows of the ablation stream their training and test samples too."""
    import gc

    from vis2ir.evaluate.ablate import references
    from vis2ir.pipeline import Vis2IRPipeline

    preds = LiveCounter()
    real_call = Vis2IRPipeline.__call__

    def counted_call(self, *a, **kw):
        out = real_call(self, *a, **kw)
        for image in out.images:
            preds.track(image)
        return out

    monkeypatch.setattr(Vis2IRPipeline, "__call__", counted_call)
    run = train_tiny(tiny_config, tmp_path)
    peaks = {}
    for limit in (8, 24):
        gc.collect()
        start = (live_samples.alive, preds.alive)  # e.g. training's last batch, held by its trainer
        live_samples.peak, preds.peak = start
        result = evaluate_checkpoint(run, overrides=["data.synth_count=120", "eval.batch_size=2", "eval.noise_draws=2"],
                                     split="test", limit=limit, out=tmp_path / f"ev{limit}")
        assert result["images"] == limit and len(result["per_image"]) == 2 * limit
        peaks[limit] = (live_samples.peak - start[0], preds.peak - start[1])
    assert peaks[24] == peaks[8] and max(peaks[24]) <= 4, peaks  # two batches of 2 at most, not 24
    gc.collect()
    start, made = live_samples.alive, live_samples.made
    live_samples.peak = start
    cfg = tiny_config(*TINY_RUN, "data.synth_count=120", "eval.fit_limit=40", "eval.limit=16", "eval.batch_size=2")
    rows = references(cfg, tmp_path / "abl")
    assert live_samples.peak - start <= 4 and live_samples.made - made == 40 + 16
    assert rows["class_oracle"]["metrics"]["psnr"] > 0


def test_checkpoint_and_folder_evaluations_give_one_number(tiny_config, tmp_path):
    """Issue 15, item 9: `--checkpoint` scores the 8-bit predictions it saves, so `--pred` on those
    files against the same truths (a folder source already at data.size: the loader neither crops nor
    resizes) gives the same figures; each report says what it scored."""
    run = train_tiny(tiny_config, tmp_path)
    source = tmp_path / "scenes"
    assert main(["data", "synth", "--out", str(source), "--count", "16", "--size", "32", "--seed", "3"]) == 0
    by_checkpoint = evaluate_checkpoint(run, overrides=[f"data.source={source}", "data.test_fraction=0.5"],
                                        split="test", limit=3, out=tmp_path / "ev")
    names = [r["name"] for r in by_checkpoint["per_image"]]
    for kind in ("infrared", "semantic"):  # the scored samples' truths and maps, as files
        (tmp_path / kind).mkdir()
        for name in names:
            (tmp_path / kind / f"{name}.png").write_bytes((source / kind / f"{name}.png").read_bytes())
    by_files = evaluate_folders(tmp_path / "ev" / "pred", tmp_path / "infrared", tmp_path / "semantic",
                                out=tmp_path / "files")
    for key in ("psnr", "ssim", "psnr_native", "ssim_native"):
        assert by_files["metrics"][key] == pytest.approx(by_checkpoint["metrics"][key], rel=1e-6, abs=1e-9), key
    assert by_files["classes"].keys() == by_checkpoint["classes"].keys()
    for name, c in by_checkpoint["classes"].items():
        assert by_files["classes"][name]["abs_err"] == pytest.approx(c["abs_err"], rel=1e-6), name
    scored = json.loads((tmp_path / "ev" / "metrics.json").read_text())["scored"]
    assert "8 bits" in scored["prediction"] and "32×32" in scored["resolution"]
    assert "centred square" in scored["truth"] and "data.ir_normalize=percentile" in scored["truth"]
    assert "at their own size" in by_files["scored"]["truth"]
    for out in ("ev", "files"):
        assert "What was scored" in (tmp_path / out / "metrics.md").read_text()
        assert Image.open(tmp_path / out / "strip.png").size[0] > 3 * 128  # prediction | truth | error


def test_a_bad_value_in_a_plan_file_names_the_plan_file(tmp_path):
    """A plan's value that the setting refuses: the line names the plan file (before: only the override)."""
    plan = tmp_path / "plan2.yaml"
    plan.write_text("- {train.max_steps: [010]}\n")
    with pytest.raises(Vis2IRError, match=r"^--plan \S*plan2\.yaml: .*train\.max_steps"):
        run_ablation(None, [], plan=plan, out=tmp_path / "ablate")
    assert not (tmp_path / "ablate").exists()
