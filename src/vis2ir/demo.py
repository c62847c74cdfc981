"""`vis2ir demo`: the whole system on the embedded default, on a CPU, with nothing downloaded.

1. makes held-out ThermalScenes (synthetic visible / infrared / semantic triptychs);
2. generates infrared with the shipped demo checkpoint (trained by `vis2ir train --config
   configs/demo.yaml` on a GPU; docs/demo.md), and with the same model untrained;
3. fits the reference predictors on training scenes (visible-colour lookup, class-mean oracle);
4. saves the adapter's attention maps where the mode has them;
5. runs a short real training from the checkpoint to show the loop works;
6. writes a report: `report.png` (a grid a person can look at) and `metrics.json`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from vis2ir.checkpoint import SHIPPED, checkpoint_path
from vis2ir.config import Config, load_config
from vis2ir.errors import Vis2IRError

log = logging.getLogger(__name__)

DEMO_CHECKPOINT = SHIPPED["demo"]


def run_demo(out_dir: str | Path = "outputs/demo", config_path: str | None = None, overrides=(),
             checkpoint: str | Path | None = None, scenes: int = 16, fit_scenes: int = 400,
             train_steps: int = 10) -> Path:
    """Run the demo; returns the path of `metrics.json`."""
    from vis2ir.checkpoint import find_checkpoint, load_model
    from vis2ir.model import build_model

    started = time.perf_counter()
    out = Path(out_dir)
    checkpoint = checkpoint_path(checkpoint or DEMO_CHECKPOINT)
    if config_path is None and not overrides and not (checkpoint / "config.yaml").exists():
        raise Vis2IRError(f"{checkpoint}: the shipped demo checkpoint is missing (reinstall vis2ir, or train one "
                          "with `vis2ir train --config configs/demo.yaml` and pass --checkpoint)")
    cfg = load_config(config_path or checkpoint / "config.yaml", overrides)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": cfg.to_dict(), "checkpoint": str(checkpoint)}

    from vis2ir.evaluate.run import iter_split, load_split

    test = load_split(cfg, "test", scenes, True)  # the report's scenes (a few)
    batch = _stack(test)
    truth = batch["infrared"]
    log.info("Demo: %d held-out ThermalScenes at %d×%d, mode %s", len(test), cfg.data.size, cfg.data.size,
             cfg.model.semantic.mode)

    trained_model = None
    if (checkpoint / "config.yaml").exists():
        trained_model, _ = load_model(find_checkpoint(checkpoint), overrides=overrides)
    untrained_model = build_model(cfg)
    predictions = {}
    # The demo draws no progress bars; these lines say which stage runs (each takes seconds to a minute).
    log.info("Demo 1/3: generating their infrared (%d denoising steps) with the %s model and the same model untrained",
             cfg.sample.steps, "shipped" if checkpoint == DEMO_CHECKPOINT else "given")
    if trained_model is not None:
        predictions["shipped"], attention = _generate(trained_model, batch, cfg, attention=True)
        _save_attention(out / "attention", batch, attention, trained_model)
    predictions["untrained"], _ = _generate(untrained_model, batch, cfg)
    log.info("Demo 2/3: fitting the reference predictors (visible-colour lookup, class means) on %d training scenes",
             fit_scenes)
    predictions.update(_baselines(iter_split(cfg, "train", fit_scenes, True), test))

    from vis2ir.evaluate.metrics import psnr_ssim

    report["metrics"] = {name: {**psnr_ssim(pred, truth, "native"), **_class_errors(pred, batch)}
                         for name, pred in predictions.items()}
    if trained_model is not None:
        report["training"] = _short_training(cfg, checkpoint, out / "train", train_steps)
    report["seconds"] = round(time.perf_counter() - started, 1)
    from vis2ir.files import write_json

    _report_picture(out / "report.png", batch, predictions, report["metrics"], cfg)
    path = write_json(out / "metrics.json", report)
    _log_summary(report, out)
    return path


# ----------------------------------------------------------------------------------------------


def _stack(samples: list[dict]) -> dict:
    return {k: torch.stack([s[k] for s in samples]) for k in ("visible", "infrared", "semantic", "classes")}


@torch.no_grad()
def _generate(model, batch: dict, cfg: Config, attention: bool = False):
    from vis2ir.sample import generate

    sem = batch["semantic"] if model.mode != "none" else None
    want = attention and model.adapter is not None
    out = generate(model.eval(), batch["visible"], sem, steps=cfg.sample.steps, guidance=cfg.sample.guidance,
                   seed=cfg.sample.seed, return_attention=want)
    return out if want else (out, None)


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
                    rows: int = 8) -> Path:
    """`report.png`: the first `rows` scenes as columns visible, semantic, truth, then each prediction
    headed by its PSNR/SSIM and look-alike class errors over all the scenes."""
    from vis2ir.figures import save_figure
    from vis2ir.visualize import labelled_grid

    columns = {"visible": batch["visible"], "semantic": batch["semantic"], "truth": batch["infrared"], **predictions}
    captions = {name: "\n".join([f"PSNR {m['psnr']:.2f} dB", f"SSIM {m['ssim']:.3f}"]
                                + [f"{k.split('/', 1)[1]} {v:.3f}" for k, v in m.items() if k.startswith("abs_err/")])
                for name, m in metrics.items()}
    n = batch["visible"].shape[0]
    title = (f"vis2ir demo: {min(rows, n)} of {n} held-out ThermalScenes ({cfg.data.size}×{cfg.data.size}), "
             f"mode {cfg.model.semantic.mode}. Under each prediction: PSNR/SSIM (native, one channel) over the "
             f"{n} scenes,\nthen the mean absolute infrared error (0–1) on classes that look alike in the visible image")
    fig = labelled_grid(columns, rows=rows, cell=128, title=title, captions=captions)
    return save_figure(path, fig)


def _save_attention(directory: Path, batch: dict, attention, model) -> None:
    if attention is None:
        return
    from vis2ir.latents import token_grid
    from vis2ir.visualize import AttentionMaps, as_rgb8, save_attention_maps

    h, w = batch["visible"].shape[-2:]
    rows, cols = token_grid(model.codec, h, 2 * w)
    for i in range(min(2, batch["visible"].shape[0])):
        weights = torch.stack([a[i] for a in attention])
        att = AttentionMaps(weights, rows, cols, (h, w))
        vis, sem = (as_rgb8(batch[k][i].permute(1, 2, 0).numpy()) for k in ("visible", "semantic"))
        points = [(0.5 * w, 0.6 * h), (0.25 * w, 0.8 * h)]  # input pixels (x, y)
        save_attention_maps(directory / f"scene{i}", vis, att, points, sem)


def _short_training(cfg: Config, checkpoint: Path, out: Path, steps: int) -> dict:
    """A real training run from the shipped checkpoint, a few steps long, on this machine."""
    import csv

    from vis2ir.train import metrics_logs, train

    overrides = [f"train.init_from={checkpoint}", f"train.output_dir={out}", f"train.max_steps={steps}",
                 "train.batch_size=4", f"train.checkpoint_every={steps}", f"train.val_every={steps}",
                 "train.val_batches=1", "train.log_every=1", "data.num_workers=0", "train.accelerator=cpu",
                 "data.synth_count=200"]
    tcfg = load_config(checkpoint / "config.yaml", overrides)
    log.info("Demo 3/3: a short real training run from the checkpoint, %d steps of batch 4 on the CPU, into %s",
             steps, out)
    started = time.perf_counter()
    run = train(tcfg, progress=False)
    logs = metrics_logs(run)[-1:]  # this launch's log only: an earlier demo may have left its own
    losses = [float(r["train/loss"]) for path in logs for r in csv.DictReader(path.open()) if r.get("train/loss")]
    return {"steps": len(losses), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "seconds": round(time.perf_counter() - started, 1),
            "run_dir": str(run)}


def _log_summary(report: dict, out: Path) -> None:
    for name, m in report["metrics"].items():
        log.info("%-15s PSNR %6.2f dB   SSIM %.3f", name, m["psnr"], m["ssim"])
    if "training" in report:
        t = report["training"]
        log.info("short training from the checkpoint: %d steps in %.0f s, loss %.4f → %.4f", t["steps"],
                 t["seconds"], t["first_loss"], t["last_loss"])
    log.info("Demo finished in %.0f s. Report: %s  Metrics: %s", report["seconds"], out / "report.png",
             out / "metrics.json")
