"""`vis2ir demo`: the whole system on the embedded default, on a CPU, with nothing downloaded.

1. makes held-out ThermalScenes (synthetic visible / infrared / semantic triptychs), once for every model;
2. generates their infrared with both shipped demo checkpoints side by side — `channel_concat` and the
   cross-attention adapter (each trained by `vis2ir train` on a GPU; docs/demo.md) — and with the
   first one's model untrained;
3. fits the reference predictors on training scenes (visible-colour lookup, class-mean oracle);
4. saves the adapter's attention maps of the cross-attention model (`attention/scene<i>/`);
5. runs a short real training from the first checkpoint to show the loop works, and compares the loss
   before and after it on the held-out scenes at fixed flow times and noise (`fixed_draw_loss`);
6. writes a report: `report.png` (a grid a person can look at, every column's scores under it) and `metrics.json`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from vis2ir import objective
from vis2ir.checkpoint import SHIPPED, checkpoint_path
from vis2ir.config import Config, load_config
from vis2ir.errors import Vis2IRError

log = logging.getLogger(__name__)

DEMO_CHECKPOINT = SHIPPED["demo"]
# What each reference column of report.png is, under its name: none is a model, and the oracle sees the truth's classes.
REFERENCES = {"class_oracle": "oracle: each class's\nmean infrared, given\nthe TRUE class map",
              "visible_lookup": "reference: the mean\ninfrared of each\nvisible colour",
              "constant": "reference: the mean\ninfrared everywhere"}


def column(name: str) -> str:
    """A shipped model's column in the report and metrics.json: 'demo' → 'shipped', 'demo_cross_attention' →
    'shipped_cross_attention'."""
    return "shipped" + name.removeprefix("demo")


def run_demo(out_dir: str | Path = "outputs/demo", config_path: str | None = None, overrides=(),
             checkpoint: str | Path | None = None, scenes: int = 16, fit_scenes: int = 400,
             train_steps: int = 10) -> Path:
    """Run the demo on the shipped checkpoints (or on `checkpoint` alone); returns the path of `metrics.json`."""
    from vis2ir.model import build_model
    from vis2ir.pipeline import Vis2IRPipeline

    started = time.perf_counter()
    out = Path(out_dir)
    checkpoints = ({column(name): path for name, path in SHIPPED.items()} if checkpoint is None
                   else {"shipped": checkpoint_path(checkpoint)})
    first = next(iter(checkpoints.values()))
    if config_path is None and not overrides and not (first / "config.yaml").exists():
        raise Vis2IRError(f"{first}: the shipped demo checkpoint is missing (reinstall vis2ir, or train one "
                          "with `vis2ir train --config configs/demo.yaml` and pass --checkpoint)")
    cfg = load_config(config_path or first / "config.yaml", overrides)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": cfg.to_dict(), "checkpoint": str(first),
                    "checkpoints": {name: str(path) for name, path in checkpoints.items()}}

    from vis2ir.evaluate.run import iter_split, load_split

    test = load_split(cfg, "test", scenes, True)  # the report's scenes (a few), shared by every model
    batch = _stack(test)
    truth = batch["infrared"]
    log.info("Demo: %d held-out ThermalScenes at %d×%d", len(test), cfg.data.size, cfg.data.size)

    # Every model samples with the demo's one `sample` section (the config file's, with the overrides).
    pipes = {name: Vis2IRPipeline.from_checkpoint(path, "cpu", overrides=overrides)
             for name, path in checkpoints.items() if (path / "config.yaml").exists()}
    for pipe in pipes.values():
        pipe.cfg.sample = cfg.sample
    pipes["untrained"] = Vis2IRPipeline(build_model(cfg), cfg, "cpu")
    modes = {name: pipe.model.mode for name, pipe in pipes.items()}
    report["modes"] = modes
    # The demo draws no progress bars; these lines say which stage runs (each takes seconds to a minute).
    log.info("Demo 1/3: generating their infrared (%d denoising steps) with %s", cfg.sample.steps,
             ", ".join(f"the {name} model ({mode})" for name, mode in modes.items()))
    predictions = {}
    for name, pipe in pipes.items():
        attention = name != "untrained" and pipe.model.adapter is not None
        predictions[name], maps = _generate(pipe, batch, attention)
        if maps is not None:
            _save_attention(out / "attention", batch, maps)
            report["attention"] = {"model": name, "folder": str(out / "attention")}
    log.info("Demo 2/3: fitting the reference predictors (visible-colour lookup, class means) on %d training scenes",
             fit_scenes)
    predictions.update(_baselines(iter_split(cfg, "train", fit_scenes, True), test))

    from vis2ir.evaluate.metrics import psnr_ssim

    report["metrics"] = {name: {**psnr_ssim(pred, truth, "native"), **_class_errors(pred, batch)}
                         for name, pred in predictions.items()}
    trained = [name for name in checkpoints if name in pipes]
    if trained:
        report["training"] = _short_training(cfg, checkpoints[trained[0]], out / "train", train_steps, batch)
    report["seconds"] = round(time.perf_counter() - started, 1)
    from vis2ir.files import write_json

    _report_picture(out / "report.png", batch, predictions, report["metrics"], cfg, modes)
    path = write_json(out / "metrics.json", report)
    _log_summary(report, out)
    return path


# ----------------------------------------------------------------------------------------------


def _stack(samples: list[dict]) -> dict:
    return {k: torch.stack([s[k] for s in samples]) for k in ("visible", "infrared", "semantic", "classes")}


def _generate(pipe, batch: dict, attention: bool = False):
    """Predictions `[B, 3, H, W]` for the batch through the public pipeline (its sample settings), and
    with `attention` the adapter's `AttentionMaps` per scene (else None)."""
    sem = list(batch["semantic"]) if pipe.needs_semantic else None
    result = pipe(list(batch["visible"]), sem, batch_size=batch["visible"].shape[0], output_type="pt",
                  return_attention=attention)
    return torch.stack(result.images), result.attention


def _baselines(fit: Iterable[dict], test: list[dict]) -> dict[str, torch.Tensor]:
    """The reference predictors fitted on the stream `fit` (no sample kept), predicting `test`."""
    from vis2ir.evaluate.baselines import fit_references

    return {name: torch.stack([p.predict(s) for s in test]) for name, p in fit_references(fit).items()}


def _class_errors(pred: torch.Tensor, batch: dict) -> dict[str, float]:
    """Mean absolute infrared error on the classes whose heat the visible image cannot tell."""
    from vis2ir.palette import CLASS_NAMES
    from vis2ir.evaluate.metrics import LOOKALIKE_CLASSES, ClassAccumulator, to_grey

    acc = ClassAccumulator(CLASS_NAMES)
    for p, t, c in zip(to_grey(pred)[:, 0], to_grey(batch["infrared"])[:, 0], batch["classes"]):
        acc.add(p, t, c)
    summary = acc.summary()
    return {f"abs_err/{c}": summary[c]["abs_err"] for c in LOOKALIKE_CLASSES if c in summary}


def _report_picture(path: Path, batch: dict, predictions: dict[str, torch.Tensor], metrics: dict, cfg: Config,
                    modes: dict[str, str], rows: int = 8) -> Path:
    """`report.png`: the first `rows` scenes as columns visible, semantic, truth, then each prediction
    headed by its model's semantic mode (`modes`, for the model columns), its PSNR/SSIM and look-alike
    class errors over all the scenes."""
    from vis2ir.figures import save_figure
    from vis2ir.visualize import labelled_grid

    columns = {"visible": batch["visible"], "semantic": batch["semantic"], "truth": batch["infrared"], **predictions}
    captions = {name: "\n".join(([f"mode {modes[name]}"] if name in modes else [])
                                + ([REFERENCES[name]] if name in REFERENCES else [])
                                + [f"PSNR {m['psnr']:.2f} dB", f"SSIM {m['ssim']:.3f}"]
                                + [f"{k.split('/', 1)[1]} {v:.3f}" for k, v in m.items() if k.startswith("abs_err/")])
                for name, m in metrics.items()}
    n = batch["visible"].shape[0]
    title = (f"vis2ir demo: {min(rows, n)} of {n} held-out ThermalScenes ({cfg.data.size}×{cfg.data.size}). "
             "Under each prediction: its semantic mode (models) or what it is (references), PSNR/SSIM (native, one "
             f"channel)\nover the {n} scenes, then the mean absolute infrared error (0–1) on classes that look alike "
             "in the visible image.\nclass_oracle is no model: it is given each scene's true class map, which no "
             "prediction from the photo has")
    fig = labelled_grid(columns, rows=rows, cell=128, title=title, captions=captions)
    return save_figure(path, fig)


def _save_attention(directory: Path, batch: dict, attention: list, scenes: int = 2) -> None:
    """The adapter's heat-maps of the first `scenes` scenes (`visualize.save_attention_maps`): where two
    query points look (mean and per head) and the attention each class region receives."""
    from vis2ir.visualize import as_rgb8, save_attention_maps

    h, w = batch["visible"].shape[-2:]
    points = [(0.5 * w, 0.6 * h), (0.25 * w, 0.8 * h)]  # input pixels (x, y)
    for i in range(min(scenes, len(attention))):
        vis, sem = (as_rgb8(batch[k][i].permute(1, 2, 0).numpy()) for k in ("visible", "semantic"))
        save_attention_maps(directory / f"scene{i}", vis, attention[i], points, sem)


def _short_training(cfg: Config, checkpoint: Path, out: Path, steps: int, scenes: dict) -> dict:
    """A real training run from the shipped checkpoint, a few steps long, on this machine: its per-step losses
    (first, last, mean, standard deviation), the learning rate its last step reached, and the loss of the
    checkpoint and of the run's result on the held-out `scenes` at fixed flow times and noise
    (`fixed_draw_loss`), the one comparison of the two that is not chance."""
    import csv
    import statistics

    from vis2ir.checkpoint import load_model
    from vis2ir.train import metrics_logs, train

    overrides = [f"train.init_from={checkpoint}", f"train.output_dir={out}", f"train.max_steps={steps}",
                 "train.batch_size=4", f"train.checkpoint_every={steps}", f"train.val_every={steps}",
                 "train.val_batches=1", "train.log_every=1", "data.num_workers=0", "train.accelerator=cpu",
                 "data.synth_count=200"]
    tcfg = load_config(checkpoint / "config.yaml", overrides)
    log.info("Demo 3/3: a short real training run from the checkpoint, %d steps of batch 4 on the CPU, into %s",
             steps, out)
    started = time.perf_counter()
    if out.exists():  # an earlier demo's training run: replaced, as the rest of its report is (never mixed)
        import shutil

        shutil.rmtree(out)
    run = train(tcfg, progress=False)
    seconds = round(time.perf_counter() - started, 1)
    logs = metrics_logs(run)[-1:]  # this launch's log only: an earlier demo may have left its own
    losses = [float(r["train/loss"]) for path in logs for r in csv.DictReader(path.open()) if r.get("train/loss")]
    t = tcfg.train
    before, after = (fixed_draw_loss(load_model(path, "cpu")[0], scenes, tcfg) for path in (checkpoint, run))
    return {"steps": len(losses), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "mean_loss": statistics.fmean(losses) if losses else None,
            "loss_sd": statistics.stdev(losses) if len(losses) > 1 else None,
            "learning_rate": t.learning_rate,
            "learning_rate_reached": t.learning_rate * (min(1.0, len(losses) / t.warmup_steps) if t.warmup_steps
                                                        else 1.0),
            "fixed_loss": {"before": before, "after": after, "scenes": int(scenes["visible"].shape[0]),
                           "times": list(objective.FIXED_TIMES)},
            "seconds": seconds, "run_dir": str(run)}


def fixed_draw_loss(model, scenes: dict, cfg: Config, seed: int = 0) -> float:
    """`objective.fixed_draw_loss` of `model` on `scenes` (`visible`, `infrared`, `semantic` `[B, 3, H, W]` in
    [0, 1]) with noise drawn from `seed`: the same draw for every model, so two models' values compare."""
    with torch.no_grad():
        return float(objective.fixed_draw_loss(model, scenes["visible"], scenes["infrared"], scenes["semantic"],
                                               torch.Generator().manual_seed(seed), cfg.train.guidance,
                                               cfg.train.loss_region))


def training_note(t: dict) -> list[str]:
    """The log lines of the short training (`_short_training`'s dict): its per-step losses and what they do
    not mean, the comparable loss before and after, and what a few steps can show."""
    lines = [f"short training from the checkpoint: {t['steps']} steps in {t['seconds']:.0f} s"]
    if t.get("first_loss") is None:
        return lines
    lines[0] += f", loss per step {t['first_loss']:.4f} → {t['last_loss']:.4f}"
    if t.get("loss_sd") is not None:
        lines[0] += f" (mean {t['mean_loss']:.4f} ± {t['loss_sd']:.4f} over the steps)"
    if t["last_loss"] > t["first_loss"]:
        lines.append("  the last step's loss is higher, which says nothing about the model: each step draws new flow "
                     "times t and noise for its 4 scenes, and the loss at small t is many times that at large t, so "
                     "two steps' losses do not compare (the comparable loss is below)")
    fixed = t.get("fixed_loss")
    if fixed:
        change = (fixed["after"] - fixed["before"]) / fixed["before"] if fixed["before"] else 0.0
        times = ", ".join(f"{v:g}" for v in fixed["times"])
        lines.append(f"  the comparable loss (the {fixed['scenes']} held-out scenes at the fixed flow times {times} "
                     f"and fixed noise): {fixed['before']:.4f} before, {fixed['after']:.4f} after ({change:+.1%})")
    if t.get("learning_rate_reached") is not None and t["learning_rate_reached"] < t["learning_rate"]:
        lines.append(f"  the learning rate was still warming up (at most {t['learning_rate_reached']:.1e} of "
                     f"{t['learning_rate']:.1e}): {t['steps']} steps barely move a trained model, so this run shows "
                     "that training works on this machine, not that it learns")
    return lines


def _log_summary(report: dict, out: Path) -> None:
    width = max(map(len, report["metrics"]))
    for name, m in report["metrics"].items():
        log.info("%-*s  PSNR %6.2f dB   SSIM %.3f", width, name, m["psnr"], m["ssim"])
    for line in training_note(report["training"]) if "training" in report else ():
        log.info("%s", line)
    log.info("Demo finished in %.0f s. Report: %s  Metrics: %s", report["seconds"], out / "report.png",
             out / "metrics.json")
