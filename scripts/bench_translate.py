"""Throughput of `vis2ir translate`: images/s of a whole data set, and how long the device waits for the host.

Real size (the default, on CUDA in bf16): the FLUX.1-Fill transformer of `configs/bench_realsize.yaml` (random
weights) with a random LoRA of its rank fused in (as a trained checkpoint brings one), mode `channel_concat` (the
maps drawn from the data set's boxes in the loader workers), the FLUX VAE architecture, 28 steps, on a YOLO data set
of `--images` ThermalScenes photos written as `--panel`² JPEGs with their objects' boxes. For each variant, one
warm-up translation (compilation included) and then the timed one, each through `run_translate` as the command runs
it (loader workers, writer thread, manifest, finalize):

- `compiled, batch B`: `sample.compile=true`, exact, for each `--batch-sizes` B;
- `compiled + taylorseer`: `sample.cache=taylorseer` (interval 5, warm-up 3: a fixed schedule, 8 of 28 steps);
- `compiled + first_block`: `sample.cache=first_block` replaying the schedule measured on the trained demo models
  (scripts/bench_generate.py's `replay`: random weights say nothing about how often an adaptive cache skips);
- `eager, batch 1`: the plain baseline.
Figures per variant: images/s over the loop, the share of the loop's wall time the device waited for the loader or
the writer (`TranslateSummary.wait_share`), finalize seconds, peak device memory. JSON to `--out`.

    python scripts/bench_translate.py --out docs/performance/translate/translate_h100.json   # an H100 / H200: ~6 min
    python scripts/bench_translate.py --tiny --images 6 --steps 2 --out /tmp/t.json          # the CPU: checks it runs
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import REAL_CONFIG, SCHEDULE, TINY, add_random_lora, measured_schedule, replay  # noqa: E402
from vis2ir.config import load_config  # noqa: E402
from vis2ir.data import render_scene  # noqa: E402
from vis2ir.files import write_json  # noqa: E402
from vis2ir.palette import PALETTE, THING_IDS, decode  # noqa: E402
from vis2ir.pipeline import Vis2IRPipeline, fuse  # noqa: E402
from vis2ir.translate.run import run_translate  # noqa: E402

log = logging.getLogger("bench_translate")
TARGETS = {"exact_images_per_s": 0.5, "cached_images_per_s": 1.5, "wait_share": 0.10}


def write_yolo_set(root: Path, count: int, panel: int, offset: int = 0) -> None:
    """`count` ThermalScenes photos as images/train/*.jpg (quality 90) and their things' boxes as labels/train/*.txt."""
    names: list[str] = []
    for i in range(count):
        scene = render_scene(offset + i, seed=0, size=(panel, panel))
        (root / "images" / "train").mkdir(parents=True, exist_ok=True)
        (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.visible).save(root / "images" / "train" / f"{i:06d}.jpg", quality=90)
        classes, instances = decode(scene.semantic)
        lines = []
        for cid in sorted(set(np.unique(classes).tolist()) & set(THING_IDS)):
            for shade in np.unique(instances[classes == cid]):
                ys, xs = np.nonzero((classes == cid) & (instances == shade))
                if PALETTE[cid][0] not in names:
                    names.append(PALETTE[cid][0])
                x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
                lines.append(f"{names.index(PALETTE[cid][0])} {(x0 + x1) / 2 / panel:.6f} {(y0 + y1) / 2 / panel:.6f} "
                             f"{(x1 - x0) / panel:.6f} {(y1 - y0) / panel:.6f}")
        (root / "labels" / "train" / f"{i:06d}.txt").write_text("\n".join(lines) + "\n" if lines else "")
    (root / "classes.txt").write_text("\n".join(names) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (checks the script runs)")
    parser.add_argument("--images", type=int, default=24, help="photos in the timed data set (default: 24)")
    parser.add_argument("--panel", type=int, help="photo size in pixels (default: 512, or 64 with --tiny)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=50.0)
    parser.add_argument("--batch-sizes", default="1,4", help="comma-separated batch sizes of the exact compiled runs")
    parser.add_argument("--workers", type=int, default=4, help="loader processes (default: 4)")
    parser.add_argument("--no-compile", action="store_true", help="eager variants only")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("vis2ir.translate.run", "vis2ir.translate.layouts"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    panel = args.panel or (64 if args.tiny else 512)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    work = Path(tempfile.mkdtemp(prefix="bench_translate_"))
    cfg = load_config(None if args.tiny else REAL_CONFIG,
                      [*(TINY if args.tiny else []), "model.semantic.mode=channel_concat",
                       f"model.prompt_cache_dir={work / 'prompts'}", f"sample.steps={args.steps}",
                       f"sample.guidance={args.guidance}", "sample.size=native", "sample.fuse=false"])
    started = time.perf_counter()
    pipe = Vis2IRPipeline.from_config(cfg, device=device, dtype=dtype)
    transformer = pipe.model.transformer
    add_random_lora(transformer, cfg.model.lora, dtype)  # then merged, as sample.fuse does
    cfg.sample.fuse = True
    fuse(pipe.model, cfg)
    built = time.perf_counter() - started
    write_yolo_set(work / "data", args.images, panel)
    write_yolo_set(work / "warm", 2 * max(int(b) for b in args.batch_sizes.split(",")), panel, offset=10_000)
    schedule = measured_schedule(SCHEDULE, args.steps, None)
    s = pipe.cfg.sample
    rows: dict[str, dict] = {}
    figures = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "dtype": str(dtype).removeprefix("torch."),
        "transformer_parameters": sum(p.numel() for p in transformer.parameters()), "panel": panel,
        "images": args.images, "steps": args.steps, "guidance": args.guidance, "workers": args.workers,
        "mode": "channel_concat (maps drawn from YOLO boxes in the loader)", "lora_rank": cfg.model.lora.rank,
        "build_s": round(built, 2), "variants": rows, "targets": TARGETS,
    }

    def variant(name: str, batch: int, cache: str = "none", note: str = "") -> None:
        s.cache = cache
        pipe.step_cache = None
        run_translate(work / "warm", work / f"warm-{len(rows)}", pipe=pipe, batch_size=batch, workers=args.workers)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        summary = run_translate(work / "data", work / f"out-{len(rows)}", pipe=pipe, batch_size=batch,
                                workers=args.workers)
        total = time.perf_counter() - t
        rows[name] = {"images_per_s": round(summary.images_per_s, 3), "seconds_per_image": round(1 / summary.images_per_s, 3),
                      "wait_share": round(summary.wait_share, 4), "loop_s": round(summary.seconds, 2),
                      "finalize_s": round(total - summary.seconds, 2), "batch_size": batch, "cache": cache, "note": note,
                      "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                      if device.type == "cuda" else None}
        log.info("%-28s %6.3f images/s  waited %5.1f %%  peak %s GiB", name, summary.images_per_s,
                 100 * summary.wait_share, rows[name]["peak_memory_gib"])
        if args.out:  # after each variant: a run cut short keeps what it measured
            write_json(args.out, figures)

    variant("eager, batch 1", 1, note="the plain baseline: sample.compile=false")
    if not args.no_compile:
        pipe.compile(s.compile_mode)
        for b in (int(b) for b in args.batch_sizes.split(",")):
            variant(f"compiled, batch {b}", b)
        variant("compiled + taylorseer", 1, "taylorseer",
                f"interval {s.cache_interval}, warm-up {s.cache_warmup}, order {s.cache_order} (fixed schedule)")
        restore = replay(schedule[1]) if schedule else (lambda: None)
        try:
            variant("compiled + first_block", 1, "first_block",
                    f"replays {schedule[0]} measured on the demo models: {sum(schedule[1])} of {args.steps} steps "
                    "computed" if schedule else "no measured schedule: the hook's own decisions (random weights)")
        finally:
            restore()
    if args.out:
        write_json(args.out, figures)
        log.info("written %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
