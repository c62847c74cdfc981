"""Time `vis2ir generate`'s code path: exact eager, compiled blocks, and the step caches, against the bare floor.

Real size (the default, on CUDA in bf16): the FLUX.1-Fill transformer of `configs/bench_realsize.yaml`
(random weights, `model.transformer.init=normal`) with a LoRA of the config's rank on the ICEdit targets (random,
as a trained checkpoint carries one), the FLUX VAE architecture with random weights, mode `none`, 512×512 panels
(a 512×1024 diptych, 2048 tokens), 28 steps, batch 1. In one process:

0. `exact, LoRA not fused`: the pipeline with `sample.fuse=false` (the LoRA's layers run beside the base's);
1. `exact`: `Vis2IRPipeline` as it ships (eager; `sample.fuse`: LoRA merged, q/k/v fused), and its floor:
   28 bare transformer forwards + one decode;
2. `taylorseer`: `sample.cache=taylorseer` (its schedule is fixed: the same steps are computed at any weights);
3. `first_block`: `sample.cache=first_block` replaying the schedule measured on the trained demo models
   (`--schedule`, written by scripts/cache_fidelity.py: a step is computed when most images computed it),
   since random weights say nothing about how often an adaptive cache skips; the first block's
   decision (with its one read-back per step) still runs, its answer is replaced;
4. the same three with `sample.compile=true` (`--compile-mode`): the first call's time (compilation
   included) and the compiled forwards' floor; and `compiled, modulation per step`: the compiled exact path
   without `speedup.modulation_table` (each adaLN layer's modulation at every step, as diffusers runs it).
Each time is the fastest of `--repeats` runs after one warm-up. Everything goes to `--out` as JSON.

    python scripts/bench_generate.py --out bench_generate.json                  # an H100 / H200: ~3-4 min
    python scripts/bench_generate.py --tiny --steps 4 --out /tmp/bench.json     # a tiny model on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import itertools
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vis2ir.checkpoint import add_lora  # noqa: E402
from vis2ir.config import load_config  # noqa: E402
from vis2ir.files import write_json  # noqa: E402
from vis2ir.latents import image_ids, mask_width, token_width  # noqa: E402
import vis2ir.speedup  # noqa: E402
from vis2ir.pipeline import Vis2IRPipeline, fuse  # noqa: E402
from vis2ir.speedup import modulation_table, per_step_modulation  # noqa: E402
from repo_paths import repo_relative  # noqa: E402 - scripts/repo_paths.py

log = logging.getLogger("bench_generate")

ROOT = Path(__file__).resolve().parents[1]
REAL_CONFIG = ROOT / "configs" / "bench_realsize.yaml"
SCHEDULE = ROOT / "docs" / "performance" / "sampling" / "cache_fidelity.json"
REAL = ["model.semantic.mode=none"]  # the real-size model of bench_realsize.yaml, sampled as stock FLUX Fill
TINY = ["model.weights=random", "model.codec=vae", "model.max_sequence_length=8", "model.transformer.num_layers=1",
        "model.transformer.num_single_layers=1", "model.transformer.attention_head_dim=16",
        "model.transformer.num_attention_heads=2", "model.transformer.joint_attention_dim=32",
        "model.transformer.pooled_projection_dim=32", "model.transformer.axes_dims_rope=[4,6,6]",
        "model.semantic.mode=none"]
MIN_PSNR = 30.0  # dB against the exact samples: the quality a replayed first_block schedule must have had


def add_random_lora(transformer: torch.nn.Module, lora_cfg, dtype: torch.dtype) -> None:
    """A LoRA of `lora_cfg`'s rank on the transformer, as a trained checkpoint brings one, with every LoRA weight
    random (N(0, 0.01²), seeded) so that it is not zero; the transformer then cast to `dtype`."""
    add_lora(transformer, lora_cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_((0.01 * torch.randn(p.shape, generator=generator)).to(p.dtype))
    transformer.to(dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def once(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def timed(fn, device: torch.device, repeats: int) -> float:
    """The fastest of `repeats` runs of `fn()`, in seconds (after one warm-up run)."""
    fn()
    return min(once(fn, device) for _ in range(repeats))


def bare_forwards(pipe: Vis2IRPipeline, panel: int, steps: int, guidance: float):
    """`steps` bare transformer forwards on same-shaped inputs, as a function (with the loop's modulation table)."""
    m, device = pipe.model, pipe.device
    codec, dtype = m.codec, m.transformer.dtype
    p = 2 * codec.scale_factor
    rows, cols = panel // p, 2 * panel // p
    width = 2 * token_width(codec) + mask_width(codec)
    kwargs = dict(
        hidden_states=torch.randn(1, rows * cols, width, device=device, dtype=dtype),
        timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
        guidance=torch.full((1,), guidance, device=device, dtype=torch.float32),
        pooled_projections=m.pooled_prompt_embeds.to(dtype), encoder_hidden_states=m.prompt_embeds.to(dtype),
        txt_ids=m.prompt_embeds.new_zeros(m.prompt_embeds.shape[1], 3), img_ids=image_ids(rows, cols, device=device),
        return_dict=False)

    timesteps = torch.full((steps,), 0.5, device=device, dtype=dtype)

    def forwards():  # as the denoising loop runs the transformer: with the adaLN modulation computed for all steps
        with torch.no_grad(), modulation_table(m.transformer, timesteps, kwargs["guidance"],
                                               kwargs["pooled_projections"]) as at_step:
            for i in range(steps):
                at_step(i)
                m.transformer(**kwargs)
    return forwards


def write_profile(fn, path: Path) -> None:
    """A torch.profiler trace of one call of `fn` (CPU ops and GPU kernels), gzipped to `path`, and a table of its ops'
    times by input shape beside it (`NAME.shapes.txt`)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_suffix("")
    prof.export_chrome_trace(str(raw))
    with raw.open("rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    table = path.parent / (path.name.split(".")[0] + ".shapes.txt")  # the device time of each op, by input shape
    sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    by_shape = prof.key_averages(group_by_input_shape=True)
    table.write_text(by_shape.table(sort_by=sort, row_limit=60, max_name_column_width=60, max_shapes_column_width=90))
    timeline = path.parent / (path.name.split(".")[0] + ".timeline.txt")
    timeline.write_text(timeline_summary(path))
    log.info("profile of one image written to %s (ops by input shape: %s; idle GPU time: %s)", path, table, timeline)


def timeline_summary(trace: Path, gap_ms: float = 0.3, early_ms: float = 50.0) -> str:
    """Where a gzipped Chrome trace's GPU waits: the span from its first kernel or copy to its last, the time busy,
    each gap over `gap_ms`, and the CPU ops over 1 ms in the first `early_ms` (what the GPU waits for at the start)."""
    events = [e for e in json.load(gzip.open(trace))["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    if not gpu:
        return "no GPU events in the trace\n"
    cpu = [e for e in events if e.get("cat") == "cpu_op"]
    start, end = gpu[0]["ts"], max(e["ts"] + e["dur"] for e in gpu)
    lines = [f"GPU span {(end - start) / 1e3:.1f} ms, busy {sum(e['dur'] for e in gpu) / 1e3:.1f} ms, "
             f"{len(gpu)} kernels and copies, the first {(start - min(e['ts'] for e in cpu)) / 1e3:.1f} ms after the "
             "first CPU op", f"gaps over {gap_ms} ms (at ms from the first GPU event, length ms, the event after):"]
    reached = gpu[0]["ts"] + gpu[0]["dur"]
    for e in gpu[1:]:
        if e["ts"] - reached > gap_ms * 1e3:
            lines.append(f"  {(e['ts'] - start) / 1e3:8.2f} {(e['ts'] - reached) / 1e3:7.2f}  {e['name'][:70]}")
        reached = max(reached, e["ts"] + e["dur"])
    lines.append(f"CPU ops over 1 ms in the first {early_ms:g} ms (at ms, length ms):")
    lines += [f"  {(e['ts'] - start) / 1e3:8.2f} {e['dur'] / 1e3:7.2f}  {e['name'][:70]}"
              for e in sorted(cpu, key=lambda e: e["ts"]) if e["dur"] > 1e3 and e["ts"] - start < early_ms * 1e3]
    return "\n".join(lines) + "\n"


def measured_schedule(path: Path, steps: int, variant: str | None) -> tuple[str, list[bool]] | None:
    """The first_block schedule to replay: of the variants measured at `steps` steps whose samples stayed
    ≥ MIN_PSNR dB from the exact ones on every demo model, the one that skipped most (or `variant`); a step
    is computed when most images computed it. None when the file has none."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    per_model = [m.get(str(steps), {}) for m in data["models"].values()]
    names = [n for n in (per_model[0] if per_model else {}) if n.startswith("first_block")]
    ok = [n for n in names if all((r.get(n, {}).get("psnr_vs_exact") or float("inf")) >= MIN_PSNR for r in per_model)]
    if variant is None:
        if not ok:
            return None
        variant = max(ok, key=lambda n: sum(r[n]["skip_rate"] for r in per_model))
    counts = np.sum([r[variant]["computed_at"] for r in per_model], axis=0)
    images = data["scenes"] * len(per_model)
    schedule = [bool(c * 2 > images) for c in counts]
    schedule[0] = True  # the first step always computes
    return variant, schedule


def replay(schedule: list[bool]):
    """Make First-Block-Cache's decisions follow `schedule` (one per transformer call, cycling per image);
    the hook still computes its own decision (and reads it back) first, as it costs."""
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    original = FBCHeadBlockHook._should_compute_remaining_blocks
    decisions = itertools.cycle(schedule)

    def decide(self, residual):
        original(self, residual)
        return next(decisions)

    FBCHeadBlockHook._should_compute_remaining_blocks = decide
    return lambda: setattr(FBCHeadBlockHook, "_should_compute_remaining_blocks", original)


@contextlib.contextmanager
def modulation_per_step():
    """The sampler without `speedup.modulation_table` (for the comparison): the layers run at every step."""
    vis2ir.speedup.modulation_table = per_step_modulation
    try:
        yield
    finally:
        vis2ir.speedup.modulation_table = modulation_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path,
                        help=f"default: {REAL_CONFIG.relative_to(ROOT)} (or a tiny model: --tiny)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (checks the script runs)")
    parser.add_argument("--panel", type=int, help="panel size in pixels (default: 512, or 64 with --tiny)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=50.0)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; the fastest counts (default: 2)")
    parser.add_argument("--compile-mode", default="default", help="sample.compile_mode (default: default)")
    parser.add_argument("--schedule", type=Path, default=SCHEDULE, help="scripts/cache_fidelity.py's JSON")
    parser.add_argument("--first-block-variant", help="which measured first_block variant to replay (default: the one "
                        f"skipping most at >= {MIN_PSNR:g} dB on every demo model)")
    parser.add_argument("--no-compile", action="store_true", help="eager variants only")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--out", "--json", dest="out", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--profile", type=Path, help="write a torch.profiler trace (Chrome / Perfetto, gzipped) of "
                        "one exact image, compiled unless --no-compile, to this file, its ops' times by input "
                        "shape beside it (NAME.shapes.txt) and where the GPU waits (NAME.timeline.txt)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="more config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    panel = args.panel or (64 if args.tiny else 512)
    with tempfile.TemporaryDirectory() as cache:
        base = None if args.tiny else (args.config or REAL_CONFIG)
        cfg = load_config(base, [*(TINY if args.tiny else REAL), f"model.prompt_cache_dir={cache}", "sample.cache=none",
                                 "sample.compile=false", "sample.fuse=false", *args.overrides])
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        start = time.perf_counter()
        pipe = Vis2IRPipeline.from_config(cfg, device=device, dtype=dtype)
        built = time.perf_counter() - start
    transformer = pipe.model.transformer
    n_params = sum(p.numel() for p in transformer.parameters())
    add_random_lora(transformer, cfg.model.lora, dtype)
    image = Image.fromarray((np.random.default_rng(0).random((panel, panel, 3)) * 255).astype(np.uint8))
    s = pipe.cfg.sample
    rows: dict[str, dict] = {}

    def generate():
        pipe(image, steps=args.steps, guidance=args.guidance, seed=0)

    def variant(name: str, cache: str, note: str = "") -> None:
        s.cache = cache
        seconds = timed(generate, device, args.repeats)
        computed = args.steps if pipe.step_cache is None else round(pipe.step_cache.computed / pipe.step_cache.total
                                                                     * args.steps, 1)
        rows[name] = {"seconds": round(seconds, 4), "images_per_s": round(1 / seconds, 3),
                      "steps_computed": computed, "note": note}
        pipe.step_cache = None
        log.info("%-30s %.3f s  (%s of %d steps computed)%s", name, seconds, computed, args.steps,
                 f"  {note}" if note else "")

    schedule = measured_schedule(args.schedule, args.steps, args.first_block_variant)
    fbc_note = (f"replays {schedule[0]} measured on the demo models: {sum(schedule[1])} of {args.steps} steps computed"
                if schedule else "no measured schedule for these steps: the hook's own decisions (random weights)")

    def cached_variants(prefix: str) -> None:
        variant(f"{prefix}taylorseer", "taylorseer",
                f"interval {s.cache_interval}, warm-up {s.cache_warmup}, order {s.cache_order} (fixed schedule)")
        restore = replay(schedule[1]) if schedule else (lambda: None)
        try:
            variant(f"{prefix}first_block", "first_block", fbc_note)
        finally:
            restore()

    variant("exact, LoRA not fused", "none", "sample.fuse=false")
    started = time.perf_counter()
    cfg.sample.fuse = True
    fuse(pipe.model, cfg)
    sync(device)
    fuse_s = time.perf_counter() - started
    variant("exact", "none", "sample.fuse: LoRA merged, q/k/v fused")
    forwards = bare_forwards(pipe, panel, args.steps, args.guidance)
    forwards_s = timed(forwards, device, args.repeats)
    latents = torch.randn(1, pipe.model.codec.latent_channels, panel // pipe.model.codec.scale_factor,
                          2 * panel // pipe.model.codec.scale_factor, device=device, dtype=pipe.model.codec.dtype)
    decode_s = timed(lambda: pipe.model.codec.decode(latents), device, args.repeats)
    cached_variants("")
    compile_s = compiled_forwards_s = None
    if not args.no_compile:
        s.cache = "none"
        pipe.compile(args.compile_mode)
        compile_s = once(generate, device)  # the first call compiles
        log.info("%-30s %.1f s (first call, compilation included)", "compile", compile_s)
        variant("compiled", "none", f"mode {args.compile_mode}")
        with modulation_per_step():
            variant("compiled, modulation per step", "none", "speedup.modulation_table off: each adaLN layer's "
                    "modulation at every step, as diffusers computes it")
        compiled_forwards_s = timed(forwards, device, args.repeats)
    if args.profile:
        s.cache = "none"
        write_profile(generate, args.profile)
    if not args.no_compile:
        cached_variants("compiled + ")
    figures = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "dtype": str(dtype).removeprefix("torch."), "transformer_parameters": n_params, "panel": panel,
        "canvas": f"{panel}x{2 * panel}", "batch_size": 1, "steps": args.steps, "guidance": args.guidance,
        "settings": [*(TINY if args.tiny else REAL), *args.overrides], "compile_mode": args.compile_mode,
        "build_s": round(built, 3), "lora_rank": cfg.model.lora.rank, "fuse_s": round(fuse_s, 2),
        "forwards_s": round(forwards_s, 4), "decode_s": round(decode_s, 4),
        "ratio_exact_to_floor": round(rows["exact"]["seconds"] / (forwards_s + decode_s), 4),
        "compile_first_call_s": None if compile_s is None else round(compile_s, 2),
        "compiled_forwards_s": None if compiled_forwards_s is None else round(compiled_forwards_s, 4),
        "first_block_schedule": None if not schedule else {"variant": schedule[0], "computed": schedule[1],
                                                           "source": repo_relative(args.schedule)},
        "variants": rows,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "targets": {"exact_s": 2.0, "cached_s": 1.0, "cached_min_psnr_vs_exact_db": MIN_PSNR},
    }
    log.info("%s, %s, transformer %.2f B parameters, %d×%d canvas, %d steps, batch 1 (built in %.1f s)",
             figures["device"], figures["dtype"], n_params / 1e9, panel, 2 * panel, args.steps, built)
    log.info("floor: %d bare forwards + decode = %.3f s + %.3f s (compiled forwards: %s s)", args.steps, forwards_s,
             decode_s, figures["compiled_forwards_s"])
    log.info("%-30s %9s %12s", "variant", "seconds", "steps run")
    for name, row in rows.items():
        log.info("%-30s %9.3f %12s", name, row["seconds"], row["steps_computed"])
    if args.out:
        write_json(args.out, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
