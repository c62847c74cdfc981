"""Training and generation speed and memory per backbone (`model.backbone`): FLUX.1 Fill against FLUX.1 Kontext.

Real size (the default, on CUDA): each backbone's transformer as `configs/bench_realsize.yaml` builds it (random
weights, block by block on the GPU, quantized on the way with `model.quantize=fp8`; tiny text-encoder stand-ins
with the real widths), semantic mode `none`, 512×512 output; Kontext by overriding that config with
`model.backbone=flux1-kontext` and what `configs/vis2ir_kontext.yaml` sets for it (`train.loss_region=target`, the
settings refuse `all`; its instruction as `model.prompt`; its `sample.guidance`). Sequence per sample: Fill's
512×1024 canvas, 2048 image tokens of 384 inputs, + 512 text tokens; Kontext's 1024 target + 1024 reference tokens
of 64 inputs + 512 text tokens. Variants, each in a fresh state (built anew, memory freed, peak reset):

- `train bf16 b<B>`, `train fp8 b<B>`: model.quantize none and fp8 (the base meant for 16 GB cards), B = 1 and 4:
  scripts/bench_train.py's plain LoRA step (`prepare_for_training`: LoRA r32 on the config's targets, bf16-true,
  gradient checkpointing of every block; forward + backward + fused AdamW on random inputs of the training shapes,
  `training_tokens`), `--steps` timed as one window after `--warmup` (`bench_train.Clock`): step s, samples/s,
  peak `max_memory_allocated` in the window (weights included), weights after the build;
- `generate eager` / `generate compiled`: `Vis2IRPipeline` with a random LoRA r32 merged (`sample.fuse`, as
  scripts/bench_generate.py's `exact`), `--sample-steps` (default: the backbone's `sample.steps`, 28) at the
  backbone's guidance (Fill 50, Kontext 2.5), batch 1, the fastest of `--repeats` after a warm-up; compiled:
  `sample.compile`'s blocks (`Vis2IRPipeline.compile`), its first call (compilation included) recorded; peak from
  before the build.
A failed variant is logged and its row holds `error`; the others still run. The table goes to the log; the rows,
with the device and the torch, diffusers, peft and torchao versions, to `--out`/backbones.json (rewritten after
each variant, so a run cut short keeps what it measured).

    python scripts/bench_backbones.py --out docs/performance/backbones        # one H100 / H200
    python scripts/bench_backbones.py --tiny --out /tmp/bb                    # tiny models on the CPU: checks it runs
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import add_random_lora, once, timed  # noqa: E402
from bench_quantize import GiB, REAL_CONFIG, TINY, attempt, fresh, peak, sync  # noqa: E402
from bench_train import Clock, Profile, plain_steps  # noqa: E402
from repo_paths import repo_relative  # noqa: E402
from vis2ir.backbones import SPECS  # noqa: E402
from vis2ir.config import load_config  # noqa: E402
from vis2ir.model import build_model  # noqa: E402
from vis2ir.pipeline import Vis2IRPipeline, fuse  # noqa: E402
from vis2ir.quantize import weight_bytes  # noqa: E402
from vis2ir.train import prepare_for_training, training_tokens  # noqa: E402

log = logging.getLogger("bench_backbones")
ROOT = Path(__file__).resolve().parents[1]
KONTEXT_CONFIG = ROOT / "configs" / "vis2ir_kontext.yaml"
TRAIN = ["train.precision=bf16-true", "train.finetune=lora", "train.gradient_checkpointing=true",
         "train.compile=false"]
GENERATE = ["sample.cache=none", "sample.compile=false", "sample.fuse=false"]


def backbone_settings(name: str) -> list[str]:
    """Overrides that make bench_realsize.yaml's model backbone `name`: Fill as it is (the ICEdit prompt, guidance 50);
    Kontext with what configs/vis2ir_kontext.yaml sets for it (loss on the target, its instruction, guidance)."""
    if name == "flux1-fill":
        return ["model.backbone=flux1-fill"]
    k = load_config(KONTEXT_CONFIG)
    return [f"model.backbone={k.model.backbone}", f"train.loss_region={k.train.loss_region}",
            f"model.prompt={k.model.prompt}", f"sample.guidance={k.sample.guidance}", f"sample.steps={k.sample.steps}"]


def settings(args, backbone: str, extra: list[str]):
    """The validated config of one variant: real size (or tiny), mode none, bf16, prompts cached in `args.work`."""
    return load_config(None if args.tiny else REAL_CONFIG,
                       [*(TINY if args.tiny else []), "model.semantic.mode=none", "model.dtype=bfloat16",
                        f"model.prompt_cache_dir={args.work}", *backbone_settings(backbone), *extra])


def allocated(device: torch.device) -> float | None:
    return round(torch.cuda.memory_allocated(device) / GiB, 2) if device.type == "cuda" else None


def train_row(args, backbone: str, quantize: str, batch: int, device: torch.device) -> dict:
    """LoRA training steps of one backbone at one quantization and batch size (see the module docstring)."""
    fresh(device)
    cfg = settings(args, backbone, [*TRAIN, f"model.quantize={quantize}", f"train.batch_size={batch}"])
    started = time.perf_counter()
    model = build_model(cfg, device)
    sync(device)
    build_s = time.perf_counter() - started
    weights = allocated(device)
    stored = round(weight_bytes(model.transformer) / GiB, 4)  # the transformer's, as quantized
    prepare_for_training(model, cfg)
    image, text = training_tokens(model, cfg)
    clock = Clock(args.warmup, args.steps, device, Profile(None, "", 0))
    plain_steps(model, cfg, args.warmup + args.steps, device, clock)
    return {"build_s": round(build_s, 2), "weights_gib": weights, "transformer_weight_gib": stored,
            "in_channels": model.transformer.config.in_channels, "image_tokens": image, "text_tokens": text,
            "first_step_s": round(clock.first_s, 3), "step_s": round(clock.step_s, 4),
            "samples_per_s": round(batch / clock.step_s, 3),
            "peak_gib": None if clock.peak_gib is None else round(clock.peak_gib, 2)}


def generate_row(args, backbone: str, compiled: bool, device: torch.device) -> dict:
    """One image at a time through the pipeline, eager or with compiled blocks (see the module docstring)."""
    fresh(device)
    cfg = settings(args, backbone, GENERATE)
    steps = args.sample_steps or cfg.sample.steps
    started = time.perf_counter()
    pipe = Vis2IRPipeline.from_config(cfg, device)
    add_random_lora(pipe.model.transformer, cfg.model.lora, pipe.model.transformer.dtype)
    cfg.sample.fuse = True
    fuse(pipe.model, cfg)  # as a pipeline built from a trained checkpoint samples: LoRA merged, q/k/v fused
    sync(device)
    row = {"build_s": round(time.perf_counter() - started, 2), "steps": steps, "guidance": cfg.sample.guidance}
    size = cfg.data.size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    outputs = []

    def generate():
        outputs[:] = [pipe(image, steps=steps, guidance=cfg.sample.guidance, seed=0, output_type="pt").images[0]]

    try:
        if compiled:
            pipe.compile(cfg.sample.compile_mode)
            row["first_call_s"] = round(once(generate, device), 2)
        seconds = timed(generate, device, args.repeats)
        row.update(seconds=round(seconds, 3), images_per_s=round(1 / seconds, 3), peak_gib=peak(device),
                   output=list(outputs[0].shape), finite=bool(torch.isfinite(outputs[0]).all()))
    finally:
        if compiled:
            torch._dynamo.reset()  # the compiled blocks' code goes; the model when this returns
    return row


def variants(args) -> list[tuple[dict, object, tuple]]:
    """(the row's first fields, function, its arguments after `args`) of each variant, in the order they run."""
    out = []
    for b in args.backbones:
        out += [({"backbone": b, "variant": f"train {'bf16' if q == 'none' else q} b{n}", "quantize": q,
                  "batch": n}, train_row, (b, q, n)) for q in args.quantize for n in args.batches]
        out += [({"backbone": b, "variant": f"generate {'compiled' if c else 'eager'}", "quantize": "none",
                  "batch": 1, "compiled": c}, generate_row, (b, c)) for c in args.compile]
    return out


def table(rows: list[dict]) -> None:
    """The rows as a table in the log."""
    columns = {"samples_per_s": "samples/s", "step_s": "step s", "seconds": "image s", "first_call_s": "1st call s",
               "peak_gib": "peak GiB", "weights_gib": "weights GiB", "transformer_weight_gib": "transformer GiB"}
    log.info("%-14s %-20s %s", "backbone", "variant", " ".join(f"{t:>{len(t)}}" for t in columns.values()))
    for r in rows:
        text = " ".join(f"{'-' if r.get(k) is None else r[k]:>{len(t)}}" for k, t in columns.items())
        log.info("%-14s %-20s %s%s", r["backbone"], r["variant"], text, f"  ERROR {r['error']}" if "error" in r else "")


def versions(device: torch.device) -> dict:
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__}
    for lib in ("diffusers", "peft", "torchao"):
        try:
            meta[lib] = __import__(lib).__version__
        except Exception:  # noqa: BLE001 - a library missing (or failing to import) is recorded as None
            meta[lib] = None
    return meta


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder for backbones.json")
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (checks that the script runs)")
    p.add_argument("--backbones", default="flux1-fill,flux1-kontext", help=f"comma-separated, of {', '.join(SPECS)}")
    p.add_argument("--quantize", default="none,fp8", help="model.quantize values to train on (default: none,fp8)")
    p.add_argument("--batches", default="1,4", help="training batch sizes (default: 1,4)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="training steps before the timed ones, >= 1 (default: 2)")
    p.add_argument("--sample-steps", type=int, help="denoising steps (default: the backbone's sample.steps, 28)")
    p.add_argument("--repeats", type=int, default=1, help="timed images after the warm-up; the fastest counts")
    p.add_argument("--generate", default="eager,compiled", help="generation variants (default: eager,compiled)")
    args = p.parse_args(argv)
    args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    if unknown := [b for b in args.backbones if b not in SPECS or b == "flux2-klein"]:
        p.error(f"--backbones: {unknown} unknown; expected flux1-fill and/or flux1-kontext")
    args.quantize = [q.strip() for q in args.quantize.split(",") if q.strip()]
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    kinds = [g.strip() for g in args.generate.split(",") if g.strip()]
    if set(kinds) - {"eager", "compiled"}:
        p.error(f"--generate: expected eager and/or compiled, got {args.generate!r}")
    args.compile = [k == "compiled" for k in kinds]
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1 or (args.sample_steps or 1) < 1:
        p.error("--warmup, --steps, --repeats and --sample-steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    for noisy in ("vis2ir", "lightning", "torchao"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for noisy in ("diffusers", "transformers"):  # casts to bf16, the tiny CLIP stand-in's 77-token cut
        logging.getLogger(noisy).setLevel(logging.ERROR)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # its backward crashed on Hopper (docs/design.md §9)
    base = load_config(None if args.tiny else REAL_CONFIG, TINY if args.tiny else [])
    meta = {**versions(device), "size": "tiny" if args.tiny else "real", "config": repo_relative(REAL_CONFIG),
            "kontext_settings": backbone_settings("flux1-kontext"), "output": f"{base.data.size}x{base.data.size}",
            "lora_rank": base.model.lora.rank, "lora_targets": base.model.lora.target_modules,
            "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
            "timing": "train: one window of `steps` steps after `warmup`, synchronised at its ends; generate: the "
                      "fastest of `repeats` images after one warm-up image"}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "backbones.json"
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_backbones_") as work:
        args.work = work
        for fields, fn, rest in variants(args):
            log.info("%s: %s", fields["backbone"], fields["variant"])
            rows.append({**fields, **attempt(fn, args, *rest, device)})
            path.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")  # after each: a cut run keeps them
    table(rows)
    log.info("%s, torch %s, diffusers %s: written %s", meta["device"], meta["torch"], meta["diffusers"], path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
