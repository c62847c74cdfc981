"""Training speed and memory at real size: `vis2ir train` against the plain bf16 LoRA step, in one process.

The model is built once. First a latent cache of a few dozen ThermalScenes samples is made with the config's
codec (`vis2ir data cache`'s code; at real size FLUX's VAE architecture with random weights), so the codec is
not in the step. Then, for each variant, `vis2ir.train.train` (Lightning, the cached-latent loader, the
adapter, LoRA, the fused AdamW, bad-step checks, logging) runs `--warmup + --steps` steps on that model, and
the **plain step** runs as many: the same transformer and LoRA in bf16, no autocast, the same AdamW, the same
checkpointing and compilation, on random inputs of the training shapes, no Lightning. Variants:

    plain_ckpt / train_ckpt          full checkpointing, eager            (ratio train/plain: target ≤ 1.05)
    train_ckpt_mixed                 the same with train.precision=bf16-mixed (fp32 LoRA under autocast)
    plain_ckpt_compiled / train_ckpt_compiled    full checkpointing, compiled blocks (target ≥ 3.5 samples/s)
    plain_auto / train_auto          gradient_checkpointing auto, the card's memory, compiled (target ≥ 5.0)
    train_auto_75                    auto with memory_budget_gib=75 (an 80 GB card), compiled

Each variant's step time is its `--steps` timed steps after `--warmup`, timed as one window with the GPU
synchronised only at its ends, so the host runs ahead of the GPU as in a training run (`Clock`). Every figure
(step, samples/s, peak `torch.cuda.max_memory_allocated` in the window, first-step time = compile time, the auto
plan) is logged as a table and written as JSON to `--out`.

    python scripts/bench_train.py --out docs/performance/train/h200.json                  # on an H200
    python scripts/bench_train.py --config configs/demo.yaml --tiny --out /tmp/bench.json  # a check on the CPU

`--profile DIR` also records two more steps of each variant, after the timed ones, with `torch.profiler`
(CPU ops with their Python stacks, GPU kernels) and writes DIR/<variant>.json.gz (a Chrome / Perfetto trace)
and DIR/<variant>.txt (the ops by self CPU time and by GPU time), to see where a variant's extra time goes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vis2ir import blocks  # noqa: E402
from vis2ir.config import load_config  # noqa: E402
from vis2ir.latent_cache import build_latent_cache  # noqa: E402
from vis2ir.latents import parameter_dtype  # noqa: E402
from vis2ir.model import build_model  # noqa: E402
from vis2ir.train import prepare_for_training, train, training_tokens  # noqa: E402
from repo_paths import repo_relative  # noqa: E402 - scripts/repo_paths.py

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
VARIANTS = {  # name: (kind, overrides)
    "plain_ckpt": ("plain", ["train.gradient_checkpointing=true"]),
    "train_ckpt": ("train", ["train.gradient_checkpointing=true"]),
    "train_ckpt_mixed": ("train", ["train.gradient_checkpointing=true", "train.precision=bf16-mixed"]),
    "plain_ckpt_compiled": ("plain", ["train.gradient_checkpointing=true", "train.compile=true"]),
    "train_ckpt_compiled": ("train", ["train.gradient_checkpointing=true", "train.compile=true"]),
    "plain_auto": ("plain", ["train.gradient_checkpointing=auto", "train.compile=true"]),
    "train_auto": ("train", ["train.gradient_checkpointing=auto", "train.compile=true"]),
    "train_auto_75": ("train", ["train.gradient_checkpointing=auto", "train.memory_budget_gib=75", "train.compile=true"]),
}
RATIOS = {"ckpt": ("train_ckpt", "plain_ckpt"), "ckpt_compiled": ("train_ckpt_compiled", "plain_ckpt_compiled"),
          "auto": ("train_auto", "plain_auto")}
PROFILED = 2  # steps recorded by --profile, after the timed ones
log = logging.getLogger("bench_train")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Profile:
    """`torch.profiler` over steps [start, start + count) of a loop, written to `folder` (None: off)."""

    def __init__(self, folder: Path | None, name: str, start: int, count: int = 2):
        self.folder, self.name, self.start, self.count, self.prof = folder, name, start, count, None

    def step(self, index: int) -> None:
        """Call before step `index` runs (and once more after the last one)."""
        if self.folder is None:
            return
        if index == self.start:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts, with_stack=True, record_shapes=False)
            self.prof.__enter__()
        elif index == self.start + self.count and self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.write()
            self.prof = None

    def write(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        raw = self.folder / f"{self.name}.json"
        self.prof.export_chrome_trace(str(raw))
        with raw.open("rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
        table = self.prof.key_averages()
        sort_gpu = "device_time_total" if torch.cuda.is_available() else "cpu_time_total"
        (self.folder / f"{self.name}.txt").write_text(
            f"{self.name}: {self.count} steps\n\nby self CPU time\n"
            + table.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70)
            + "\n\nby GPU time\n" + table.table(sort_by=sort_gpu, row_limit=40, max_name_column_width=70))
        log.info("profile of %s written to %s", self.name, self.folder)


class Clock:
    """Times a loop of steps as training runs them: the GPU is synchronised only after the first step (whose time
    includes compilation), after the warm-up and after the timed steps, so the host runs ahead of the GPU as it does
    in a training run (a sync after every step would add the host's work before the step's first kernel to every
    step). `step_s`: the timed window / its steps; `peak_gib`: the most allocated in that window. Starts the
    profiler after the timed steps (`Profile`)."""

    def __init__(self, warmup: int, steps: int, device: torch.device, profile: Profile):
        self.warmup, self.steps, self.device, self.profile = warmup, steps, device, profile
        self.started = self.first_s = self.window_start = self.step_s = self.peak_gib = None

    def start(self) -> None:
        sync(self.device)
        self.started = time.perf_counter()

    def done(self, step: int) -> None:
        """Call after `step` steps have been launched (1, 2, …)."""
        if step in (1, self.warmup, self.warmup + self.steps):
            sync(self.device)
        now = time.perf_counter()
        if step == 1:
            self.first_s = now - self.started
        if step == self.warmup:
            self.window_start = now
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
        if step == self.warmup + self.steps:
            self.step_s = (now - self.window_start) / self.steps
            if self.device.type == "cuda":
                self.peak_gib = torch.cuda.max_memory_allocated(self.device) / GiB
        self.profile.step(step)


class ClockCallback(L.Callback):
    """`Clock` for `vis2ir train`'s steps; hands the model back before Lightning's teardown would move it to the CPU."""

    def __init__(self, clock: Clock):
        self.clock, self.model = clock, None

    def on_train_start(self, trainer, module):
        self.clock.start()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.clock.done(trainer.global_step)

    def on_train_end(self, trainer, module):
        self.model, module.model = module.model, None


def plain_steps(model, cfg, total: int, device: torch.device, clock: Clock) -> None:
    """The plain bf16 LoRA step, `total` times: transformer forward + backward on random inputs of the training
    shapes, no autocast, the fused AdamW on the (bf16) LoRA weights, zero_grad."""
    transformer = model.transformer
    b = cfg.train.batch_size
    image, text = training_tokens(model, cfg)
    dtype = parameter_dtype(transformer)
    hidden = torch.randn(b, image, transformer.config.in_channels, device=device, dtype=dtype)
    kwargs = dict(timestep=torch.full((b,), 0.5, device=device), guidance=torch.full((b,), 1.0, device=device),
                  pooled_projections=model.pooled_prompt_embeds.to(dtype).expand(b, -1),
                  encoder_hidden_states=model.prompt_embeds.to(dtype).expand(b, -1, -1),
                  txt_ids=torch.zeros(text, 3, device=device), img_ids=torch.zeros(image, 3, device=device),
                  return_dict=False)
    lora = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay, fused=True)
    transformer.train()
    clock.start()
    for i in range(total):
        out = transformer(hidden_states=hidden, **kwargs)[0]
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.done(i + 1)


def run_variant(name: str, model, base, overrides: list[str], args, device: torch.device) -> dict:
    kind, settings = VARIANTS[name]
    profiled = args.profile if name in args.profile_variants.split(",") else None
    total = args.warmup + args.steps + (PROFILED if profiled else 0)
    cfg = load_config(args.config, [*base, *settings, *overrides, f"train.max_steps={total}"])
    row = {"variant": name, "kind": kind, "settings": settings}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    prepare_for_training(model, cfg)  # LoRA dtype, checkpointing plan, compiled blocks, as `train` does
    plan = getattr(model.transformer, "_vis2ir_plan", None)
    if cfg.train.gradient_checkpointing == "auto":
        row["checkpointed_blocks"] = sum(plan) if plan is not None else None
    clock = Clock(args.warmup, args.steps, device, Profile(profiled, name, args.warmup + args.steps, PROFILED))
    if kind == "plain":
        plain_steps(model, cfg, total, device, clock)
    else:
        train(cfg, model=model, callbacks=[ClockCallback(clock)], progress=False)
    step = clock.step_s
    row.update(first_step_s=round(clock.first_s, 3), step_s=round(step, 4),
               samples_per_s=round(cfg.train.batch_size / step, 3),
               peak_gib=None if clock.peak_gib is None else round(clock.peak_gib, 2))
    log.info("%-22s first step %7.2f s   step %.3f s   %6.2f samples/s   peak %s GiB", name, clock.first_s, step,
             row["samples_per_s"], row["peak_gib"])
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "bench_realsize.yaml"))
    p.add_argument("--out", required=True, help="JSON file of every figure")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cache-samples", type=int, default=40, help="ThermalScenes scenes rendered for the cache")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--profile", type=Path, help="write a torch.profiler trace and table of 2 more steps here")
    p.add_argument("--profile-variants", default="plain_ckpt,train_ckpt", help="which variants --profile records")
    p.add_argument("--tiny", action="store_true", help="small and short on the CPU: budgets scaled down, batch 2")
    p.add_argument("overrides", nargs="*", help="key=value settings for every variant")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    for noisy in ("lightning", "vis2ir.train", "vis2ir.model", "vis2ir.backbone"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # its backward crashed on Hopper (docs/design.md §9)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    base = [f"data.synth_count={args.cache_samples}", "data.val_fraction=0.05", "data.test_fraction=0.05",
            "train.precision=bf16-true", "train.val_batches=0",
            f"train.max_steps={args.steps + args.warmup}",
            f"train.output_dir={work / 'run'}", "train.checkpoint_every=1000000", "train.log_every=1000000",
            "data.num_workers=2", "model.semantic.mode=none"]
    if args.tiny:
        base += ["train.batch_size=2", "train.finetune=lora"]
        VARIANTS["train_auto_75"] = ("train", ["train.gradient_checkpointing=auto", "train.memory_budget_gib=0.2",
                                               "train.compile=true"])
    cfg = load_config(args.config, [*base, *args.overrides])
    started = time.perf_counter()
    cache = build_latent_cache(cfg, work / "cache", device=device)
    cache_s = time.perf_counter() - started
    base.append(f"data.latent_cache={cache}")
    cfg = load_config(args.config, [*base, *args.overrides])
    started = time.perf_counter()
    model = build_model(cfg, device)
    sync(device)
    build_s = time.perf_counter() - started
    rows = []
    # Eager variants before compiled ones: a compiled block stays compiled.
    for name in sorted(names, key=lambda n: "compile=true" in " ".join(VARIANTS[n][1])):
        try:
            rows.append(run_variant(name, model, base, args.overrides, args, device))
        except Exception as err:  # noqa: BLE001 - a benchmark records every failure and goes on
            log.exception("%s failed", name)
            rows.append({"variant": name, "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"})
    by_name = {r["variant"]: r for r in rows if "step_s" in r}
    ratios = {key: round(by_name[a]["step_s"] / by_name[b]["step_s"], 3)
              for key, (a, b) in RATIOS.items() if a in by_name and b in by_name}
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "config": repo_relative(args.config), "overrides": args.overrides,
            "batch_size": cfg.train.batch_size, "panel": cfg.data.size, "tokens": training_tokens(model, cfg),
            "steps": args.steps, "warmup": args.warmup, "cache_samples": args.cache_samples,
            "cache_build_s": round(cache_s, 1), "model_build_s": round(build_s, 2), "from_latent_cache": True,
            "timing": "one window of `steps` steps after `warmup`, the GPU synchronised only at its ends"}
    for lib in ("diffusers", "peft", "lightning"):
        meta[lib] = __import__(lib).__version__
    result = {**meta, "ratios_train_over_plain": ratios, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("%-22s %10s %10s %10s %12s", "variant", "step s", "samples/s", "peak GiB", "first step s")
    for r in rows:
        log.info("%-22s %10s %10s %10s %12s", r["variant"], r.get("step_s", "-"), r.get("samples_per_s", "-"),
                 r.get("peak_gib", "-"), r.get("first_step_s", r.get("error", "-")))
    log.info("vis2ir/plain at equal settings: %s (target <= 1.05); written %s", ratios, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
