"""Training and generation at higher resolution (768 and 1024 panels, and a 5:4 bucket): memory and time.

For each panel shape W×H the real-size model (`configs/bench_realsize.yaml`: random weights built on
the GPU, LoRA r32, gradient checkpointing, batch 1, bf16 autocast over a bf16 base as `vis2ir train`
runs it) makes a few training steps the way `Vis2IRModule.training_step` does (`model.encode` of the
[visible | infrared] diptych through the VAE, flow times and noise, the model's forward, the flow
loss, backward, AdamW), then `Vis2IRPipeline` generates one image of that shape. Reported per shape:
tokens of the diptych, median step time, samples/s, peak `torch.cuda.max_memory_allocated` (weights
included) of training and of generation, and generation time. A table is logged and every figure is
written as JSON to `--out`.

    python scripts/bench_resolution.py --out docs/performance/resolution.json                 # on an H200
    python scripts/bench_resolution.py --out /tmp/r.json model.quantize=fp8                    # fp8 base
    python scripts/bench_resolution.py --config configs/demo.yaml --shapes 64x64,80x48 \\
        --steps 1 --warmup 1 --gen-steps 2 --out /tmp/r.json                                   # CPU: checks it runs
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vis2ir.config import load_config  # noqa: E402
from vis2ir.data.synth import parse_shapes  # noqa: E402
from vis2ir.files import write_text  # noqa: E402
from vis2ir.latents import patch_size  # noqa: E402
from vis2ir.model import build_model  # noqa: E402
from vis2ir.pipeline import Vis2IRPipeline  # noqa: E402
from vis2ir.semantic.modes import num_panels  # noqa: E402
from vis2ir.train import flow_loss, prepare_for_training, sample_noise, sample_timesteps  # noqa: E402
from repo_paths import repo_relative  # noqa: E402 - scripts/repo_paths.py

log = logging.getLogger("bench_resolution")
REAL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "bench_realsize.yaml"
GiB = 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh(device: torch.device) -> None:
    """Free what the last shape held and count the peak from here (the weights stay: they count)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GiB, 2) if device.type == "cuda" else None


def train_steps(model, cfg, optimizer, width: int, height: int, steps: int, warmup: int, device) -> list[float]:
    """Wall times of `steps` training steps (after `warmup`) at panels of `width × height`."""
    b, t_cfg = cfg.train.batch_size, cfg.train
    g = torch.Generator(device).manual_seed(0)
    vis, ir, sem = (torch.rand(b, 3, height, width, generator=g, device=device) for _ in range(3))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        with autocast:
            enc = model.encode(vis, ir, sem)
            t = sample_timesteps(b, t_cfg.timestep_mean, t_cfg.timestep_std, t_cfg.timestep_shift, g)
            noise = sample_noise(enc.x_0.float(), t_cfg.offset_noise, g)
            pred, target = model(vis, ir, sem, t, noise, guidance=t_cfg.guidance, encoded=enc)
            loss = flow_loss(pred, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def generate(pipe, width: int, height: int, steps: int, device) -> float:
    """Seconds to generate one `width × height` image (its output checked to be that size)."""
    g = torch.Generator().manual_seed(1)
    vis, sem = torch.rand(3, height, width, generator=g), torch.rand(3, height, width, generator=g)
    sync(device)
    start = time.perf_counter()
    out = pipe(vis, semantic=sem if pipe.needs_semantic else None, steps=steps, size="native").images[0]
    sync(device)
    if out.size != (width, height):
        raise RuntimeError(f"generated {out.size}, expected {(width, height)}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REAL_CONFIG))
    parser.add_argument("--shapes", default="768x768,1024x1024,1120x896",
                        help="panel shapes WIDTHxHEIGHT,... (1120x896: the 5:4 bucket of data.size 1024)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per shape")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps per shape first")
    parser.add_argument("--gen-steps", type=int, default=28, help="sampling steps of the generation (0: none)")
    parser.add_argument("--out", required=True, help="JSON file of every figure")
    parser.add_argument("overrides", nargs="*", help="key=value settings over the config")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    cfg = load_config(args.config, ["train.batch_size=1", "train.gradient_checkpointing=true", *args.overrides])
    shapes = parse_shapes(args.shapes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # as `vis2ir train` (cuDNN attention backward on Hopper)
    fresh(device)
    started = time.perf_counter()
    model = prepare_for_training(build_model(cfg, device), cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    built = {"seconds": round(time.perf_counter() - started, 1), "peak_gib": peak(device)}
    p = patch_size(model.codec)
    rows = []
    for width, height in shapes:
        if width % p or height % p:
            raise SystemExit(f"--shapes {width}x{height}: each side must be a multiple of {p} for this codec")
        tokens = (height // p) * (width * num_panels(model.mode) // p)
        row = {"width": width, "height": height, "image_tokens": tokens, "batch": cfg.train.batch_size}
        fresh(device)
        try:
            times = train_steps(model, cfg, optimizer, width, height, args.steps, args.warmup, device)
            step = statistics.median(times)
            row.update(train_step_s=round(step, 3), train_steps_s=[round(t, 3) for t in times],
                       samples_per_s=round(cfg.train.batch_size / step, 3), train_peak_gib=peak(device))
        except torch.OutOfMemoryError:
            row.update(train_error="out of memory", train_peak_gib=peak(device))
        optimizer.zero_grad(set_to_none=True)
        if args.gen_steps:
            model.eval()
            pipe = Vis2IRPipeline(model, cfg, device)
            fresh(device)
            try:
                with torch.no_grad():
                    row.update(generate_s=round(generate(pipe, width, height, args.gen_steps, device), 2),
                               generate_steps=args.gen_steps, generate_peak_gib=peak(device))
            except torch.OutOfMemoryError:
                row.update(generate_error="out of memory", generate_peak_gib=peak(device))
            model.train()
        rows.append(row)
        log.info("%s", row)
    import diffusers

    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "torch": torch.__version__, "diffusers": diffusers.__version__, "config": repo_relative(args.config),
              "overrides": args.overrides,
              "settings": {"mode": cfg.model.semantic.mode, "codec": cfg.model.codec, "quantize": cfg.model.quantize,
                           "lora_rank": cfg.model.lora.rank, "gradient_checkpointing": True,
                           "batch_size": cfg.train.batch_size,
                           "autocast": "bf16" if device.type == "cuda" else "none (fp32 on the CPU)",
                           "timed_steps": args.steps, "warmup_steps": args.warmup},
              "model_built": built, "shapes": rows, "seconds": round(time.perf_counter() - started, 1)}
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    header = f"{'panel':>10} {'tokens':>7} {'step s':>7} {'samples/s':>9} {'train GiB':>9} {'gen s':>7} {'gen GiB':>8}"
    lines = [header] + [
        f"{str(r['width']) + 'x' + str(r['height']):>10} {r['image_tokens']:>7} {r.get('train_step_s', r.get('train_error', '')):>7} "
        f"{r.get('samples_per_s', ''):>9} {str(r.get('train_peak_gib')):>9} {r.get('generate_s', r.get('generate_error', '')):>7} "
        f"{str(r.get('generate_peak_gib', '')):>8}" for r in rows]
    log.info("%s (%s, batch %d, gradient checkpointing, %s):\n%s\nwritten to %s", result["device"],
             cfg.model.semantic.mode, cfg.train.batch_size, result["settings"]["autocast"], "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
