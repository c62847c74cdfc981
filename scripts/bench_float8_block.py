"""Float8 products against bf16 on one real-size FLUX.1 block of each kind, compiled (`model.quantize=fp8`).

One `FluxTransformerBlock` (double stream) and one `FluxSingleTransformerBlock` at FLUX.1's width (3072, 24 heads
of 128), random N(0, 0.02) weights, the sequence of a 512×1024 canvas (2048 image + 512 text tokens), batch 1
and 4: the median time of a forward (sampling) and of a forward + backward to the inputs with frozen weights (a
LoRA step's base), bf16 against the same block quantized by `model.quantize=fp8`, both `torch.compile`d; the
relative error of the float8 output against bf16's. The whole model has 19 double and 38 single blocks; the
block times say what fp8 can gain before the rest of a step is counted. Prints a table, writes JSON.

    python scripts/bench_float8_block.py --out docs/performance/quantize/float8_block.json   # one H100 / H200
    python scripts/bench_float8_block.py --tiny --out /tmp/f8.json                          # checks it runs (CPU)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vis2ir import quantize  # noqa: E402


def blocks(dim: int, heads: int):
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    return {"double": FluxTransformerBlock(dim, heads, dim // heads),
            "single": FluxSingleTransformerBlock(dim, heads, dim // heads)}


def run(block, kind, batch, image, text, dim, device, backward):
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, image, dim, device=device, dtype=torch.bfloat16, generator=g)
    c = torch.randn(batch, text, dim, device=device, dtype=torch.bfloat16, generator=g)
    temb = torch.randn(batch, dim, device=device, dtype=torch.bfloat16, generator=g)
    x.requires_grad_(backward)
    out = block(x, c, temb=temb)[1]
    if backward:
        out.float().square().mean().backward()
    return out.detach()


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dim, heads, image, text = (64, 2, 64, 16) if args.tiny else (3072, 24, 2048, 512)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "products": quantize.float8_products(device)[1], "rows": []}
    torch.manual_seed(0)
    for kind, bf16 in blocks(dim, heads).items():
        for q in bf16.parameters():
            q.data.normal_(0, 0.02)
        bf16 = bf16.to(device, torch.bfloat16).requires_grad_(False)
        fp8 = copy.deepcopy(bf16)
        quantize._fp8(fp8, device)
        variants = {"bf16": torch.compile(bf16), "fp8": torch.compile(fp8)}
        for batch in (1, 4):
            row = {"block": kind, "batch": batch}
            outs = {}
            for name, block in variants.items():
                for backward in (False, True):
                    fn = lambda b=block, bw=backward: run(b, kind, batch, image, text, dim, device, bw)  # noqa: E731
                    with torch.no_grad() if not backward else torch.enable_grad():
                        outs[name] = fn()
                        fn()  # compiled by now
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats(device)
                        seconds = timed(fn, device, args.repeats)
                    label = "fwd_bwd" if backward else "fwd"
                    row[f"{name}_{label}_ms"] = round(seconds * 1e3, 3)
                    if device.type == "cuda":
                        row[f"{name}_{label}_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            for label in ("fwd", "fwd_bwd"):
                row[f"speedup_{label}"] = round(row[f"bf16_{label}_ms"] / row[f"fp8_{label}_ms"], 3)
            row["relative_error"] = round(((outs["fp8"].float() - outs["bf16"].float()).norm()
                                           / outs["bf16"].float().norm()).item(), 4)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
