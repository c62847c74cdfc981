"""Time `vis2ir generate`'s code path against its floor: the bare transformer forwards plus one VAE decode.

Real size (the default, on CUDA in bf16): the FLUX.1-Fill transformer built with random weights
(`model.transformer.init=normal`: empty weights on the device, filled with N(0, 0.02)), the FLUX VAE
architecture with random weights (block_out_channels 128/256/512/512, 16 latent channels, 2 layers
per block, shift 0.1159, scale 0.3611, no quant convs), 512×512 panels (a 512×1024 diptych, 2048
tokens), 28 steps. In the same run: 28 bare transformer forwards on same-shaped inputs and one decode
of the whole canvas. Target: pipeline ≤ 1.10 × (forwards + decode).

    python scripts/bench_generate.py                 # on an H100 / H200
    python scripts/bench_generate.py --tiny          # a tiny model on the CPU: checks that it runs
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

from vis2ir.config import load_config  # noqa: E402
from vis2ir.latents import image_ids, mask_width, token_width  # noqa: E402
from vis2ir.pipeline import Vis2IRPipeline  # noqa: E402

log = logging.getLogger("bench_generate")

REAL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "bench_realsize.yaml"
REAL = ["model.semantic.mode=none"]  # the real-size model of bench_realsize.yaml, sampled as stock FLUX Fill
TINY = ["model.backbone=random", "model.codec=vae", "model.max_sequence_length=8", "model.transformer.num_layers=1",
        "model.transformer.num_single_layers=1", "model.transformer.attention_head_dim=16",
        "model.transformer.num_attention_heads=2", "model.transformer.joint_attention_dim=32",
        "model.transformer.pooled_projection_dim=32", "model.transformer.axes_dims_rope=[4,6,6]",
        "model.semantic.mode=none"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """The fastest of `repeats` runs of `fn()`, in seconds (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def bare_floor(pipe: Vis2IRPipeline, panel: int, steps: int, guidance: float, repeats: int) -> tuple[float, float]:
    """Seconds for `steps` bare transformer forwards and for one decode of the whole canvas."""
    m, device = pipe.model, pipe.device
    codec, dtype = m.codec, m.transformer.dtype
    p = 2 * codec.scale_factor
    rows, cols = panel // p, 2 * panel // p
    width = 2 * token_width(codec) + mask_width(codec)
    hidden = torch.randn(1, rows * cols, width, device=device, dtype=dtype)
    kwargs = dict(
        hidden_states=hidden, timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
        guidance=torch.full((1,), guidance, device=device, dtype=torch.float32),
        pooled_projections=m.pooled_prompt_embeds.to(dtype), encoder_hidden_states=m.prompt_embeds.to(dtype),
        txt_ids=m.prompt_embeds.new_zeros(m.prompt_embeds.shape[1], 3), img_ids=image_ids(rows, cols, device=device),
        return_dict=False)

    def forwards():
        for _ in range(steps):
            m.transformer(**kwargs)

    latents = torch.randn(1, codec.latent_channels, panel // codec.scale_factor, 2 * panel // codec.scale_factor,
                          device=device, dtype=codec.dtype)
    return timed(forwards, device, repeats), timed(lambda: codec.decode(latents), device, repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (checks the script runs)")
    parser.add_argument("--panel", type=int, help="panel size in pixels (default: 512, or 64 with --tiny)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=50.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the fastest counts (default: 3)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="more config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    panel = args.panel or (64 if args.tiny else 512)
    with tempfile.TemporaryDirectory() as cache:
        cfg = load_config(None if args.tiny else REAL_CONFIG,
                          [*(TINY if args.tiny else REAL), f"model.prompt_cache_dir={cache}", *args.overrides])
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        start = time.perf_counter()
        pipe = Vis2IRPipeline.from_config(cfg, device=device, dtype=dtype)
        built = time.perf_counter() - start
    n_params = sum(p.numel() for p in pipe.model.transformer.parameters())
    image = Image.fromarray((np.random.default_rng(0).random((panel, panel, 3)) * 255).astype(np.uint8))
    pipeline_s = timed(lambda: pipe(image, steps=args.steps, guidance=args.guidance, seed=0), device, args.repeats)
    forwards_s, decode_s = bare_floor(pipe, panel, args.steps, args.guidance, args.repeats)
    floor = forwards_s + decode_s
    figures = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "transformer_parameters": n_params, "panel": panel,
        "steps": args.steps, "build_s": round(built, 3), "pipeline_s": round(pipeline_s, 4),
        "forwards_s": round(forwards_s, 4), "decode_s": round(decode_s, 4), "ratio": round(pipeline_s / floor, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }
    log.info("%s, %s, transformer %.2f B parameters, %d×%d panels, %d steps (built in %.1f s)", figures["device"],
             figures["dtype"], n_params / 1e9, panel, panel, args.steps, built)
    log.info("generate code path:       %.3f s", pipeline_s)
    log.info("%d bare forwards + decode: %.3f s + %.3f s = %.3f s", args.steps, forwards_s, decode_s, floor)
    log.info("ratio: %.3f (target <= 1.10)", pipeline_s / floor)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
