"""Memory and speed of a quantized frozen base (`model.quantize`) at real size, in one process.

For each of `none`, `fp8`, `nf4` the real-size FLUX.1-Fill transformer (random weights,
`configs/bench_realsize.yaml`) is built block by block on the GPU, quantized on the way, and:
- **train**: plain LoRA steps (r32 on the ICEdit targets, bf16 LoRA, no autocast, AdamW, gradient
  checkpointing) on a 512×1024 diptych at batch 1 and 4: median step time and peak
  `torch.cuda.max_memory_allocated` counted from before the model was built (weights included);
- **generate**: `Vis2IRPipeline` at 512×512 (a 512×1024 canvas), 28 steps, with and without
  model CPU offload: time, peak, and the PSNR of the image against the first variant's (bf16), same seed.
`--compile`: the transformer's blocks compiled (`train.compile`, `sample.compile`) in every variant, the
first steps / image (compiling) not timed. `fp8` runs its products in float8 where the GPU has them
(compute capability ≥ 8.9) and says so in its row (`products`); `torchao-fp8dq` (generation only, where
torchao imports): torchao's `Float8DynamicActivationFloat8WeightConfig` with per-row scales on the same
layers, for comparison.
Every figure is printed as a table and written as JSON (one file per section) under `--out`.

    python scripts/bench_quantize.py --out docs/performance/quantize    # on an H200
    python scripts/bench_quantize.py --compile --quantize none,fp8,torchao-fp8dq --offload none --out DIR
    python scripts/bench_quantize.py --tiny --out /tmp/q                # a tiny model on the CPU: checks it runs
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

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vis2ir.checkpoint import add_lora  # noqa: E402
from vis2ir.config import load_config  # noqa: E402
from vis2ir.evaluate.metrics import psnr_ssim  # noqa: E402
from vis2ir.model import build_model  # noqa: E402
from vis2ir.pipeline import Vis2IRPipeline  # noqa: E402
from vis2ir.quantize import Float8Linear, blocks, weight_bytes  # noqa: E402
from vis2ir.speedup import compile_blocks  # noqa: E402

REAL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "bench_realsize.yaml"
TINY = ["model.weights=random", "model.codec=vae", "model.max_sequence_length=8", "model.transformer.num_layers=1",
        "model.transformer.num_single_layers=1", "model.transformer.attention_head_dim=32",
        "model.transformer.num_attention_heads=2", "model.transformer.joint_attention_dim=32",
        "model.transformer.pooled_projection_dim=32", "model.transformer.axes_dims_rope=[8,12,12]",
        "model.vae.block_out_channels=[16,16,16,16]", "model.vae.layers_per_block=1", "model.vae.norm_num_groups=8",
        "data.size=64"]
GiB = 2**30


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh(device):
    """Free what the last variant held and start counting the peak from here."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GiB, 2) if device.type == "cuda" else None


def config(args, how: str):
    overrides = [*(TINY if args.tiny else []), "model.semantic.mode=none",
                 f"model.quantize={'none' if how == TORCHAO else how}", "model.dtype=bfloat16",
                 "train.gradient_checkpointing=true", f"sample.compile={str(args.compile).lower()}"]
    return load_config(None if args.tiny else REAL_CONFIG, overrides)


TORCHAO = "torchao-fp8dq"


def torchao_float8(transformer) -> None:
    """torchao's dynamic float8 activations and weights, per-row scales, on the layers that `fp8` multiplies
    in float8 (the blocks' linear layers but the modulation's)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    for block in blocks(transformer):
        quantize_(block, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=lambda m, name: type(m) is torch.nn.Linear and not name.endswith("norm1.linear")
                  and not name.endswith(("norm1_context.linear", "norm.linear")))


def products(transformer) -> str:
    """How the quantized layers multiply: float8, upcast, or none quantized."""
    kinds = {m.float8 for m in transformer.modules() if isinstance(m, Float8Linear)}
    return "float8" if True in kinds else "upcast" if kinds else "-"


def train_steps(args, how: str, device) -> dict:
    fresh(device)
    cfg = config(args, how)
    started = time.perf_counter()
    model = build_model(cfg, device)
    sync(device)
    built = time.perf_counter() - started
    transformer = model.transformer
    add_lora(transformer, cfg.model.lora)
    lora = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(True)
    if args.compile:
        compile_blocks(transformer, setting="train.compile")
    transformer.enable_gradient_checkpointing()
    transformer.train()
    weights = round(torch.cuda.memory_allocated(device) / GiB, 2) if device.type == "cuda" else None
    optimizer = torch.optim.AdamW(lora, lr=1e-4)
    out = {"variant": variant(how, args), "quantize": how, "products": products(transformer),
           "compiled": args.compile, "build_s": round(built, 2), "weights_gib": weights,
           "transformer_weight_gib": round(weight_bytes(transformer) / GiB, 2)}
    size = cfg.data.size
    n = (size // 16) * (2 * size // 16)
    for batch in args.batches:
        hidden = torch.randn(batch, n, transformer.config.in_channels, device=device, dtype=torch.bfloat16)
        kwargs = dict(timestep=torch.full((batch,), 0.5, device=device), guidance=torch.full((batch,), 1.0, device=device),
                      pooled_projections=model.pooled_prompt_embeds.expand(batch, -1),
                      encoder_hidden_states=model.prompt_embeds.expand(batch, -1, -1),
                      txt_ids=torch.zeros(model.prompt_embeds.shape[1], 3, device=device),
                      img_ids=torch.zeros(n, 3, device=device), return_dict=False)
        times = []
        for i in range(args.warmup + args.steps):
            sync(device)
            start = time.perf_counter()
            pred = transformer(hidden_states=hidden, **kwargs)[0]
            pred.float().square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        out[f"b{batch}_step_s"] = round(statistics.median(times), 4)
        out[f"b{batch}_samples_per_s"] = round(batch / statistics.median(times), 3)
        out[f"b{batch}_peak_gib"] = peak(device)
        del hidden, pred
    del model, transformer, optimizer, lora
    return out


def variant(how: str, args) -> str:
    return f"{'bf16' if how == 'none' else how}{'-compiled' if args.compile else ''}"


def generate(args, how: str, offload: str, device, reference: dict) -> dict:
    fresh(device)
    cfg = config(args, how)
    started = time.perf_counter()
    pipe = Vis2IRPipeline.from_config(cfg, device, offload=offload)
    if how == TORCHAO:
        torchao_float8(pipe.model.transformer)
    sync(device)
    built = time.perf_counter() - started
    size = cfg.data.size
    g = np.random.default_rng(0)
    image = Image.fromarray(g.integers(0, 255, (size, size, 3), dtype=np.uint8))
    times = []
    for _ in range(args.generate_repeats + 1):  # the first is a warm-up
        sync(device)
        start = time.perf_counter()
        out = pipe(image, steps=28, guidance=50.0, seed=0, output_type="pt").images[0]
        sync(device)
        times.append(time.perf_counter() - start)
    result = {"variant": variant(how, args), "quantize": how, "products": products(pipe.model.transformer),
              "compiled": args.compile, "offload": offload, "build_s": round(built, 2),
              "first_s": round(times[0], 3), "seconds": round(min(times[1:]), 3), "peak_gib": peak(device),
              "finite": bool(torch.isfinite(out).all())}
    if reference:  # the same seed's image from the first variant (bf16): how far this one moved it
        result["psnr_vs_" + reference["variant"]] = round(psnr_ssim(out.float().mean(0)[None, None].cpu(),
                                                                  reference["image"], "native")["psnr"], 2)
    else:
        reference |= {"variant": result["variant"], "image": out.float().mean(0)[None, None].cpu()}
    del pipe
    return result


def attempt(fn, *a) -> dict:
    """Run one measurement; a failure is recorded with its one-line reason, and the next one runs."""
    try:
        return fn(*a)
    except Exception as err:  # noqa: BLE001 - a benchmark reports every failure and goes on
        logging.exception("failed")
        text = str(err).strip().splitlines()
        return {"error": f"{type(err).__name__}: {text[0] if text else ''}"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (checks that the script runs)")
    p.add_argument("--quantize", default="none,fp8,nf4")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--generate-repeats", type=int, default=1)
    p.add_argument("--offload", default="none,model")
    p.add_argument("--offload-unquantized", action="store_true", help="also time offload of the bf16 model")
    p.add_argument("--skip", default="", help="sections to skip: train, generate")
    p.add_argument("--compile", action="store_true", help="compile the transformer's blocks in every variant")
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    logging.basicConfig(level=logging.WARNING, format="[%(levelname)s] %(message)s")
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)  # its backward crashed on Hopper (docs/design.md §9)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "size": "real" if not args.tiny else "tiny"}
    for lib in ("diffusers", "peft", "torchao", "bitsandbytes"):
        try:
            meta[lib] = __import__(lib).__version__
        except Exception:  # noqa: BLE001
            meta[lib] = None
    kinds = args.quantize.split(",")
    if "train" not in args.skip:
        rows = [attempt(train_steps, args, how, device) for how in kinds if how != TORCHAO]
        (out / "train.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
        print(json.dumps(rows, indent=1), flush=True)
    if "generate" not in args.skip:
        # An offloaded unquantized model is built on the CPU: at real size, filling 12 B random weights
        # there takes minutes, so that pair runs only when asked for.
        pairs = [(h, o) for h in kinds for o in args.offload.split(",")
                 if h != "none" or o == "none" or args.offload_unquantized]
        reference = {}
        rows = [attempt(generate, args, how, offload, device, reference) for how, offload in pairs]
        (out / "generate.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
        print(json.dumps(rows, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
