"""The real-pairs experiment (docs/results.md, "Real pairs: MSRS"): small FLUX-shaped models trained from
scratch on MSRS with semantic maps drawn from its detection boxes, scored on its test split.

    # 1. a copy of ../shared/real/msrs at half size (320×240; a GPU machine receives at most 64 MiB)
    python scripts/real_pairs.py prepare --src ../shared/real/msrs --dst outputs/msrs320 --scale 0.5
    # 2. the plan of rows for `vis2ir ablate`, with this copy's label folders in it
    python scripts/real_pairs.py plan --data outputs/msrs320 > outputs/real_pairs_plan.yaml
    # 3. train and score every row, 2 seeds (several runs side by side on each GPU)
    scripts/ablate_gpus.sh 10 --config configs/real_pairs.yaml --plan outputs/real_pairs_plan.yaml --seeds 0,1 \
        --out runs/real_pairs data.source=outputs/msrs320 data.boxes=outputs/msrs320/labels/visible
    # 4. the table: every row scored again on the test split at the data's size, per class with the boxes
    #    annotated on the infrared images, day and night apart, the semantic rows also with no map
    python scripts/real_pairs.py score --data outputs/msrs320 --out runs/real_pairs
    # 5. does each variant's output vary with the photo? (spread across photos, correlation with what is
    #    particular to each truth; docs/results.md, "Why the photo is not read")
    python scripts/real_pairs.py reading --data outputs/msrs320 --out runs/real_pairs

Step 4 writes `real_pairs.json` and `real_pairs.md` into `--out`: mean ± sample standard deviation over seeds.
Never copy the images, or pictures made from them, into the repository (../shared/real/README.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vis2ir.config import EvalConfig
from vis2ir.evaluate.baselines import ColourLookupPredictor, ConstantPredictor
from vis2ir.evaluate.scoring import Scorer
from vis2ir.files import write_json, write_text
from vis2ir.io.boxes import BoxLabels
from vis2ir.io.images import read_image, to_tensor
from vis2ir.palette import decode

log = logging.getLogger("real_pairs")
SPLITS = ("train", "test")
CLASSES = ("person", "car")
SUBSETS = {"all": "", "day": "D", "night": "N"}  # MSRS names end in D (day) or N (night)


def prepare(src: Path, dst: Path, scale: float) -> None:
    """visible/{train,test}/*.jpg, infrared/{train,test}/*.png scaled by `scale` (bicubic; the JPEGs re-encoded
    at quality 95), the YOLO labels copied unchanged (they are fractions of the image size)."""
    for split in SPLITS:
        for kind, suffix in (("visible", ".jpg"), ("infrared", ".png")):
            for path in sorted((src / kind / split).glob(f"*{suffix}")):
                out = dst / kind / split / path.name
                out.parent.mkdir(parents=True, exist_ok=True)
                image = read_image(path)
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
                image.save(out, quality=95) if suffix == ".jpg" else image.save(out)
    shutil.copytree(src / "labels", dst / "labels", dirs_exist_ok=True)
    log.info("prepared %s at scale %g", dst, scale)


PLAN = """# The rows of the real-pairs experiment (scripts/real_pairs.py; docs/results.md, "Real pairs: MSRS").
# The base (configs/real_pairs.yaml + data.boxes=<visible labels>) is channel_concat with box maps drawn from
# the labels annotated on the visible images, bucket panels of 320x240.
-
  model.semantic.mode: [none]
-
  model.semantic.mode: [channel_concat]
-
  data.boxes: [{data}/labels/infrared]
-
  train.semantic_dropout: [0.3]
-
  data.resize_policy: [center_crop]
"""


def names(data: Path, split: str, subset: str = "") -> list[str]:
    return sorted(p.stem for p in (data / "visible" / split).glob("*.jpg") if p.stem.endswith(subset))


def load_pair(data: Path, split: str, name: str) -> dict:
    vis = to_tensor(read_image(data / "visible" / split / f"{name}.jpg"))
    ir = to_tensor(read_image(data / "infrared" / split / f"{name}.png"))
    return {"visible": vis, "infrared": ir}


def box_classes(labels: BoxLabels, split: str, name: str, size: tuple[int, int]) -> torch.Tensor:
    """Palette class ids `[H, W]` of the boxes of `labels` for one image (`size`: width, height)."""
    return torch.from_numpy(decode(labels.draw(labels.find(f"{split}/{name}"), *size))[0])


def score_folder(data: Path, predict, ir_labels: BoxLabels, device) -> dict:
    """The Scorer result of `predict(name, sample) -> [3, H, W]` over the test split (per class on the maps drawn
    from `ir_labels`)."""
    scorer = Scorer(EvalConfig(), device)
    for name in names(data, "test"):
        sample = load_pair(data, "test", name)
        classes = box_classes(ir_labels, "test", name, tuple(sample["infrared"].shape[-1:-3:-1]))
        scorer.add(name, predict(name, sample), sample["infrared"], classes)
    return scorer.result()


def summary(result: dict) -> dict:
    """The figures of the table from `score_folder`'s result: PSNR and SSIM over every test image and over the
    day and night ones apart (from its per-image rows), per-class errors over all."""
    out = {}
    for subset, suffix in SUBSETS.items():
        rows = [r for r in result["per_image"] if r["name"].endswith(suffix)]
        for key in ("psnr", "ssim", "psnr_native"):
            out[f"{subset}/{key}"] = float(np.mean([r[key] for r in rows]))
    for c in CLASSES:
        cls = result["classes"].get(c, {})
        out[f"{c}/abs_err"], out[f"{c}/hallucinated"] = cls.get("abs_err"), cls.get("hallucinated_heat")
    return out


def score(data: Path, out: Path, device) -> None:
    """Every finished variant of `vis2ir ablate` in `out` (its saved test predictions, and for the semantic
    rows a generation with no map), and the two reference predictors, in one table."""
    from vis2ir.pipeline import Vis2IRPipeline

    ir_labels = BoxLabels.open(data / "labels" / "infrared")
    rows: dict[str, list[dict]] = {}
    train = [load_pair(data, "train", n) for n in names(data, "train")]
    for ref, fitted in (("constant (training mean)", ConstantPredictor.fit(train)),
                        ("visible-colour lookup", ColourLookupPredictor.fit(train))):
        rows[ref] = [summary(score_folder(data, lambda n, s, f=fitted: f.predict(s), ir_labels, device))]
    for result_file in sorted(out.glob("variants/*/result.json")):
        variant = json.loads(result_file.read_text())
        folder = result_file.parent
        pred_dir = folder / "eval" / "pred" / "test"

        def saved(name, sample, pred_dir=pred_dir):
            return to_tensor(read_image(pred_dir / f"{name}.png"))

        rows.setdefault(variant["group"], []).append(summary(score_folder(data, saved, ir_labels, device)))
        pipe = Vis2IRPipeline.from_checkpoint(folder / "run", device)
        if pipe.needs_semantic:  # the same model given no map: the all-unknown map (black)

            def no_map(name, sample, pipe=pipe):
                blank = Image.new("RGB", tuple(sample["visible"].shape[-1:-3:-1]))
                return pipe(sample["visible"], [blank], output_type="pt").images[0]

            no = summary(score_folder(data, no_map, ir_labels, device))
            rows.setdefault(f"{variant['group']}, scored with no map", []).append(no)
        log.info("scored %s", folder.name)
    table = {row: {k: _mean_sd([r[k] for r in runs]) for k in runs[0]} | {"runs": len(runs)}
             for row, runs in rows.items()}
    write_json(out / "real_pairs.json", table)
    write_text(out / "real_pairs.md", markdown(table))
    sys.stdout.write(markdown(table))


def _mean_sd(values: list) -> list | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return [float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0]


def markdown(table: dict) -> str:
    cols = ["all/psnr", "all/ssim", "all/psnr_native", "day/psnr", "night/psnr", "person/abs_err",
            "car/abs_err", "person/hallucinated", "car/hallucinated"]
    head = ["row", "runs", "PSNR", "SSIM", "PSNR native", "PSNR day", "PSNR night", "person err", "car err",
            "person halluc.", "car halluc."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, values in table.items():
        cells = []
        for c in cols:
            v = values.get(c)
            digits = 2 if "psnr" in c else 3
            cells.append("–" if v is None else f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}" if values["runs"] > 1
                         else f"{v[0]:.{digits}f}")
        lines.append(f"| {row} | {values['runs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def reading_stats(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Does `pred` (N, H, W, grey in [0, 1]) vary with the photo as `truth` (N, H, W) does?

    spread: the per-pixel standard deviation across the N images, averaged over pixels (a template: 0);
    own / other: mean squared error of a prediction to its own truth / to the other images' truths;
    corr: Pearson correlation of each prediction with its truth once the per-pixel mean over the N images is
    removed from both (the part particular to each photo), averaged over images (nothing predicted: 0)."""
    n = len(pred)
    if n < 2:
        raise SystemExit("reading: needs at least 2 test images")
    errors = ((pred[:, None] - truth[None]) ** 2).mean(axis=(2, 3))  # [prediction, truth]
    own = float(np.trace(errors) / n)
    other = float((errors.sum() - np.trace(errors)) / (n * (n - 1)))
    p, t = pred - pred.mean(0), truth - truth.mean(0)
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] if a.std() > 0 and b.std() > 0 else 0.0 for a, b in zip(p, t)]
    return {"spread": float(pred.std(0).mean()), "own": own, "other": other, "corr": float(np.mean(corr))}


def reading(data: Path, out: Path) -> None:
    """The photo-reading diagnostic (`reading_stats`) of every variant's saved test predictions in `out`, of
    the truths themselves and of the constant image, at the truths' size; written to `out`/reading.md."""
    test = names(data, "test")

    def grey(folder: Path) -> np.ndarray:
        size = read_image(data / "infrared" / "test" / f"{test[0]}.png").size
        return np.stack([np.asarray(read_image(folder / f"{n}.png").convert("L").resize(size, Image.BILINEAR),
                                    dtype=np.float64) / 255 for n in test])

    truth = grey(data / "infrared" / "test")
    train = [np.asarray(read_image(data / "infrared" / "train" / f"{n}.png").convert("L"), dtype=np.float64) / 255
             for n in names(data, "train")]
    rows = {"the truths themselves": reading_stats(truth, truth),
            "constant (training mean)": reading_stats(np.repeat(np.mean(train, axis=0)[None], len(test), 0), truth)}
    for pred_dir in sorted(out.glob("variants/*/eval/pred/test")):
        rows[pred_dir.parts[-4]] = reading_stats(grey(pred_dir), truth)
    lines = ["| run | spread | MSE to its own truth | MSE to the other truths | corr |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['spread']:.4f} | {v['own']:.4f} | {v['other']:.4f} | {v['corr']:.3f} |"
              for k, v in rows.items()]
    write_text(out / "reading.md", "\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("prepare")
    q.add_argument("--src", type=Path, required=True)
    q.add_argument("--dst", type=Path, required=True)
    q.add_argument("--scale", type=float, default=0.5)
    q = sub.add_parser("plan")
    q.add_argument("--data", type=Path, required=True)
    q = sub.add_parser("score")
    q.add_argument("--data", type=Path, required=True)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    q = sub.add_parser("reading", help="does each variant's output vary with the photo? (reading.md)")
    q.add_argument("--data", type=Path, required=True)
    q.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.command == "prepare":
        prepare(args.src, args.dst, args.scale)
    elif args.command == "plan":
        sys.stdout.write(PLAN.format(data=args.data))
    elif args.command == "reading":
        reading(args.data, args.out)
    else:
        score(args.data, args.out, args.device)


if __name__ == "__main__":
    main()
