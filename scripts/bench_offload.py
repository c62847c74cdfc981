"""Time offloaded generation: `Vis2IRPipeline.offload(model|sequential)` on the real-size FLUX.1 Fill transformer.

The model is built from configs/bench_realsize.yaml with random weights (nothing is downloaded), fused as a
loaded checkpoint is (`sample.fuse`), eager, then offloaded; each image is 28 steps at 512×1024, batch 1. Prints
and writes (`--out`) the device, each image's seconds and the peak GPU memory (`torch.cuda.max_memory_allocated`,
from after the offload). `--tiny` runs a tiny model on the CPU (checks the script runs; its figures mean nothing).

    python scripts/bench_offload.py sequential --images 2 --out offload.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vis2ir.config import load_config  # noqa: E402
from vis2ir.pipeline import OFFLOAD, Vis2IRPipeline  # noqa: E402

log = logging.getLogger("bench_offload")
TINY = ["model.weights=random", "model.codec=vae", "model.max_sequence_length=8", "model.transformer.num_layers=1",
        "model.transformer.num_single_layers=1", "model.transformer.attention_head_dim=16",
        "model.transformer.num_attention_heads=2", "model.transformer.joint_attention_dim=32",
        "model.transformer.pooled_projection_dim=32", "model.transformer.axes_dims_rope=[4,6,6]"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("offload", choices=[o for o in OFFLOAD if o != "none"])
    parser.add_argument("--images", type=int, default=2, help="images timed one after another (default: 2)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (checks the script runs)")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    panel = 64 if args.tiny else 512
    with tempfile.TemporaryDirectory() as cache:
        cfg = load_config(None if args.tiny else ROOT / "configs" / "bench_realsize.yaml",
                          [*(TINY if args.tiny else []), "model.semantic.mode=none", f"model.prompt_cache_dir={cache}",
                           "sample.compile=false", "sample.fuse=true"])
        start = time.perf_counter()
        # built on the device (fast for random weights), then offloaded: the weights end on the CPU either way
        pipe = Vis2IRPipeline.from_config(cfg, device=device, dtype=torch.bfloat16 if device.type == "cuda" else None)
    pipe.offload(args.offload)
    sync(device)
    built = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    image = Image.fromarray((np.random.default_rng(0).random((panel, panel, 3)) * 255).astype(np.uint8))
    figures = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "diffusers": diffusers.__version__, "offload": args.offload, "steps": args.steps,
               "canvas": f"{panel}x{2 * panel}", "build_and_offload_s": round(built, 1), "times": []}
    for _ in range(args.images):
        sync(device)
        start = time.perf_counter()
        pipe(image, steps=args.steps, guidance=50.0, seed=0)
        sync(device)
        figures["times"].append(round(time.perf_counter() - start, 3))
        log.info("offload %s: one image in %.2f s", args.offload, figures["times"][-1])
    figures["peak_gib"] = (round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda"
                           else None)
    log.info("%s", json.dumps(figures))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
