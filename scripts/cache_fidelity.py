"""What the step caches (`sample.cache`) cost in quality and how often they skip, on the trained demo models.

For each shipped demo model (`demo`: channel_concat; `demo_cross_attention`: the adapter with RoPE on
the condition) and each step count, every variant (exact, First-Block-Cache at some thresholds,
TaylorSeer) is run through `vis2ir evaluate --checkpoint` (the docs/results.md protocol: held-out
ThermalScenes, PSNR/SSIM ThermalGen and native, per-class errors) at batch 1, so that an adaptive
cache decides for each image alone, as it would at batch 1 on the GPU. Besides those metrics:
the PSNR of each variant's saved predictions against the exact ones (8-bit, as written), and the
steps computed in full (per variant, and per step index: the schedule `scripts/bench_generate.py`
replays at real size). Random real-size weights would say nothing about either.

    python scripts/cache_fidelity.py --out docs/performance/sampling_cache.json     # 2-core CPU, ~10 min
    python scripts/cache_fidelity.py --out /tmp/c.json --scenes 4 --steps 8        # a quick check
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vis2ir.evaluate.metrics import LOOKALIKE_CLASSES  # noqa: E402
from vis2ir.evaluate.run import evaluate_checkpoint  # noqa: E402
from vis2ir.files import write_json  # noqa: E402
from vis2ir.pipeline import Vis2IRPipeline  # noqa: E402

log = logging.getLogger("cache_fidelity")

ASSETS = Path(__file__).resolve().parents[1] / "src" / "vis2ir" / "assets"
MODELS = {"demo (channel_concat)": ASSETS / "demo", "demo_cross_attention": ASSETS / "demo_cross_attention"}
VARIANTS = {
    "exact": ["sample.cache=none"],
    "first_block 0.1": ["sample.cache=first_block", "sample.cache_threshold=0.1"],
    "first_block 0.2": ["sample.cache=first_block", "sample.cache_threshold=0.2"],
    "first_block 0.3": ["sample.cache=first_block", "sample.cache_threshold=0.3"],
    "first_block 0.5": ["sample.cache=first_block", "sample.cache_threshold=0.5"],
    "taylorseer 5/3": ["sample.cache=taylorseer", "sample.cache_interval=5", "sample.cache_warmup=3"],
    "taylorseer 3/3": ["sample.cache=taylorseer", "sample.cache_interval=3", "sample.cache_warmup=3"],
}


CLASSES = (*LOOKALIKE_CLASSES, "road", "sky-other-merged")  # the look-alikes, a warm and a cold class


def psnr_8bit(a: Path, b: Path) -> float:
    """PSNR (data range 1) of two 8-bit grey images as written."""
    x = np.asarray(Image.open(a).convert("L"), np.float64) / 255
    y = np.asarray(Image.open(b).convert("L"), np.float64) / 255
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def one_model(checkpoint: Path, steps: int, scenes: int, root: Path) -> dict:
    pipe = Vis2IRPipeline.from_checkpoint(checkpoint, "cpu", overrides=[f"sample.steps={steps}"])
    pipe.cfg.eval.batch_size = 1  # an adaptive cache decides for each image alone (as at batch 1 on the GPU)
    rows = {}
    for name, overrides in VARIANTS.items():
        for key_value in overrides:
            key, value = key_value.split("=")
            field = key.split(".")[1]
            setattr(pipe.cfg.sample, field, type(getattr(pipe.cfg.sample, field))(value))
        out = root / f"{checkpoint.name}_{steps}_{name.replace(' ', '_')}"
        started = time.perf_counter()
        result = evaluate_checkpoint(checkpoint, limit=scenes, out=out, device="cpu", pipe=pipe)
        seconds = time.perf_counter() - started
        m, classes = result["metrics"], result["classes"]
        row = {"psnr": round(m["psnr"], 3), "ssim": round(m["ssim"], 4), "psnr_native": round(m["psnr_native"], 3),
               "ssim_native": round(m["ssim_native"], 4),
               "class_abs_err": {c: round(classes[c]["abs_err"], 4) for c in CLASSES if c in classes},
               "seconds_cpu": round(seconds, 1)}
        cache = pipe.step_cache
        if cache is not None:
            row |= {"steps_computed": round(cache.computed / scenes, 2), "skip_rate": round(cache.skip_rate, 3),
                    "computed_at": cache.computed_at}
            pipe.step_cache = None  # the next variant counts afresh
            exact = root / f"{checkpoint.name}_{steps}_exact" / "pred"
            vs = [psnr_8bit(p, exact / p.name) for p in sorted((out / "pred").glob("*.png"))]
            finite = [v for v in vs if np.isfinite(v)]
            row |= {"psnr_vs_exact": round(statistics.mean(finite), 2) if finite else None,  # None: all identical
                    "psnr_vs_exact_min": round(min(finite), 2) if finite else None,
                    "identical_images": len(vs) - len(finite)}
        rows[name] = row
        log.info("%-22s %-18s %2d steps: PSNR %.2f dB, SSIM %.3f%s", checkpoint.name, name, steps, row["psnr"],
                 row["ssim"], "" if cache is None else f"; vs exact {row['psnr_vs_exact']} dB (min "
                 f"{row['psnr_vs_exact_min']}), {row['steps_computed']} of {steps} steps computed")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--scenes", type=int, default=16, help="held-out scenes per model (default 16)")
    p.add_argument("--steps", default="28",
                   help="step counts, comma-separated (default 28: the GPU benchmark's; the demo's own is 16)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(levelname)s] %(message)s")
    log.setLevel(logging.INFO)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # small models on a shared 2-core machine: one thread each is faster than two fighting
    result = {"device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "torch": torch.__version__, "scenes": args.scenes, "batch_size": 1,
              "variants": {k: v for k, v in VARIANTS.items()}, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for label, checkpoint in MODELS.items():
            result["models"][label] = {}
            for steps in (int(s) for s in args.steps.split(",")):
                result["models"][label][str(steps)] = one_model(checkpoint, steps, args.scenes, Path(tmp))
                write_json(args.out, result)  # kept as soon as measured
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
