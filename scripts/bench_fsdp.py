"""FSDP against DDP on the GPUs of one machine, through `vis2ir train`'s own code path.

Three launches of `vis2ir.train.train`, each a subprocess (Lightning starts one process per GPU in it):
1. `train.strategy=ddp`: `--warmup` steps, then `--steps` measured ones;
2. `train.strategy=fsdp`: the same, then a checkpoint and 2 more steps;
3. `train.strategy=fsdp` resumed from that checkpoint to the same end: its 2 losses must equal run 2's
   (every rank's; exact equality).
For 1 and 2: every rank's peak `torch.cuda.max_memory_allocated` over the measured steps (and over the
whole launch, the model build included: each rank builds the whole model before sharding it), the
median step time and samples/s (batch × devices / step time). A table is logged; everything is written
as JSON to `--out`.

    python scripts/bench_fsdp.py --config configs/bench_realsize.yaml --out bench_fsdp.json train.batch_size=1
    python scripts/bench_fsdp.py --config configs/demo.yaml --out /tmp/fsdp.json train.accelerator=cpu \\
        train.batch_size=2 data.synth_count=64 data.num_workers=0 train.max_minutes=null    # checks it on a CPU

The whole script stops after `--time-limit` seconds (default 330), whatever is left undone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from repo_paths import repo_relative  # noqa: E402 - scripts/repo_paths.py

log = logging.getLogger("bench_fsdp")
GiB = 2**30


def worker(args) -> None:
    """One launch (`--worker ddp|fsdp`), run by every rank; each rank writes `{--part}.rank{N}.json`."""
    import lightning as L

    from vis2ir.config import load_config
    from vis2ir.train import train

    class Clock(L.Callback):
        """Per-step wall times over the measured steps, losses, and this rank's memory peaks."""

        def __init__(self):
            self.times, self.losses, self.last, self.rank = [], {}, None, 0
            self.peak = self.build_peak = None  # GiB: the measured steps'; the launch's up to them

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            cuda = module.device.type == "cuda"
            if cuda:
                torch.cuda.synchronize(module.device)
            now, step = time.perf_counter(), trainer.global_step
            self.rank = trainer.global_rank
            self.losses[step] = float(outputs["loss"])
            if self.last is not None and args.warmup < step <= args.warmup + args.steps:
                self.times.append(now - self.last)
            if step == args.warmup and cuda:
                self.build_peak = torch.cuda.max_memory_allocated(module.device) / GiB
                torch.cuda.reset_peak_memory_stats(module.device)
            if step == args.warmup + args.steps and cuda:
                self.peak = torch.cuda.max_memory_allocated(module.device) / GiB
            self.last = now

    measured_end = args.warmup + args.steps
    cfg = load_config(args.config, [*args.overrides, f"train.strategy={args.worker}", f"train.devices={args.devices}",
                                    f"train.output_dir={args.run_dir}", "train.log_every=1",
                                    f"train.checkpoint_every={measured_end + 1}", f"train.max_steps={measured_end + 3}",
                                    "train.keep_last=2", "train.val_every=1000000"])
    clock = Clock()
    train(cfg, resume=args.resume, progress=False, callbacks=[clock])
    device = torch.cuda.get_device_name(torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    part = {"rank": clock.rank, "device": device, "step_times_s": clock.times, "losses": clock.losses,
            "peak_gib": clock.peak, "peak_with_build_gib": clock.build_peak, "batch_size": cfg.train.batch_size}
    Path(f"{args.part}.rank{clock.rank}.json").write_text(json.dumps(part))


def launch(args, strategy: str, run_dir: Path, part: Path, deadline: float, resume: str | None = None) -> list[dict]:
    """Run one launch in a subprocess; its ranks' parts."""
    cmd = [sys.executable, __file__, "--worker", strategy, "--config", args.config, "--devices", str(args.devices),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--run-dir", str(run_dir), "--part", str(part),
           *(["--resume", resume] if resume else []), *args.overrides]
    log.info("launch: %s", " ".join(cmd))
    subprocess.run(cmd, check=True, timeout=max(1.0, deadline - time.monotonic()),
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(
                       [str(Path(__file__).resolve().parents[1] / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])})
    return [json.loads(Path(f"{part}.rank{r}.json").read_text()) for r in range(args.devices)]


def summary(parts: list[dict], devices: int) -> dict:
    step = statistics.median(parts[0]["step_times_s"]) if parts[0]["step_times_s"] else None
    return {"median_step_s": step, "samples_per_s": parts[0]["batch_size"] * devices / step if step else None,
            "peak_gib_per_rank": [p["peak_gib"] for p in parts],
            "peak_with_build_gib_per_rank": [p["peak_with_build_gib"] for p in parts],
            "step_times_s_rank0": parts[0]["step_times_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/bench_realsize.yaml")
    parser.add_argument("--out", required=False, help="JSON file for every figure")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="measured steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--time-limit", type=float, default=330, help="seconds for the whole script")
    parser.add_argument("--work-dir", default="runs/bench_fsdp")
    parser.add_argument("--worker", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--resume", help=argparse.SUPPRESS)
    parser.add_argument("--skip-ddp", action="store_true", help="FSDP only (the resume check without the comparison)")
    parser.add_argument("--repeat", action="store_true",
                        help="launch the uninterrupted FSDP run twice: does the GPU repeat its own losses? (bounds "
                             "what the resume check can show)")
    parser.add_argument("overrides", nargs="*", help="key=value settings")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.worker:
        return worker(args)
    if not args.out:
        parser.error("--out FILE is required")
    import diffusers
    import lightning

    deadline = time.monotonic() + args.time_limit
    work = Path(args.work_dir)
    result = {"config": repo_relative(args.config), "overrides": args.overrides, "devices": args.devices, "steps": args.steps,
              "warmup": args.warmup, "torch": torch.__version__, "diffusers": diffusers.__version__,
              "lightning": lightning.__version__}
    ddp = None if args.skip_ddp else launch(args, "ddp", work / "ddp", work / "ddp", deadline)
    fsdp = launch(args, "fsdp", work / "fsdp", work / "fsdp", deadline)
    result["device"] = fsdp[0]["device"]
    result["fsdp"] = summary(fsdp, args.devices)
    if ddp:
        result["ddp"] = summary(ddp, args.devices)
    end = args.warmup + args.steps + 3
    checkpoint = work / "fsdp" / "checkpoints" / f"step-{end - 2}"
    resumed = launch(args, "fsdp", work / "fsdp", work / "fsdp-resumed", deadline, resume=str(checkpoint))
    result["fsdp_resume"] = {
        "from_step": end - 2,
        "straight_losses_per_rank": [[p["losses"][str(s)] for s in (end - 1, end)] for p in fsdp],
        "resumed_losses_per_rank": [[p["losses"][str(s)] for s in (end - 1, end)] for p in resumed],
    }
    result["fsdp_resume"]["exact"] = (result["fsdp_resume"]["straight_losses_per_rank"]
                                      == result["fsdp_resume"]["resumed_losses_per_rank"])
    if args.repeat:
        again = launch(args, "fsdp", work / "fsdp-repeat", work / "fsdp-repeat", deadline)
        losses = [[p["losses"][str(s)] for s in (end - 1, end)] for p in again]
        result["fsdp_repeat"] = {"straight_again_losses_per_rank": losses,
                                 "repeats_itself": losses == result["fsdp_resume"]["straight_losses_per_rank"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))

    def gib(values):
        return " / ".join("-" if v is None else f"{v:.1f}" for v in values)

    log.info("%s, %d devices, batch %d per device", result["device"], args.devices, fsdp[0]["batch_size"])
    log.info("%-6s %14s %12s %26s %26s", "", "step (median)", "samples/s", "peak GiB per rank (steps)",
             "peak GiB per rank (+build)")
    for name in ("ddp", "fsdp")[1 if ddp is None else 0:]:
        r = result[name]
        log.info("%-6s %13.3fs %12.2f %26s %26s", name, r["median_step_s"] or float("nan"),
                 r["samples_per_s"] or float("nan"), gib(r["peak_gib_per_rank"]),
                 gib(r["peak_with_build_gib_per_rank"]))
    log.info("fsdp resume from step %d: %s (straight %s, resumed %s)", end - 2,
             "exact" if result["fsdp_resume"]["exact"] else "NOT EXACT",
             result["fsdp_resume"]["straight_losses_per_rank"], result["fsdp_resume"]["resumed_losses_per_rank"])
    if "fsdp_repeat" in result:
        log.info("fsdp uninterrupted run launched again: %s (%s)",
                 "the same losses" if result["fsdp_repeat"]["repeats_itself"] else "OTHER LOSSES",
                 result["fsdp_repeat"]["straight_again_losses_per_rank"])
    log.info("written %s", args.out)


if __name__ == "__main__":
    main()
