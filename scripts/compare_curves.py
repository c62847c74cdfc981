"""Compare the loss curves of training runs (e.g. 1 GPU against 2-GPU DDP at the same global batch).

    python scripts/compare_curves.py RUN_A RUN_B [--window 50]

Reads each run's `logs/version_*/metrics.csv` and prints, per window of steps, the mean training
loss of each run, and every validation loss; then the largest relative gap between the runs.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from vis2ir.train import metrics_logs


def read_metrics(run: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(train loss by step, validation loss by step) over all launches of a run."""
    train, val = {}, {}
    for path in metrics_logs(run):  # a resumed run's later launches win
        for row in csv.DictReader(path.open()):
            step = int(row["step"])
            if row.get("train/loss"):
                train[step] = float(row["train/loss"])
            if row.get("val/loss"):
                val[step] = float(row["val/loss"])
    if not train:
        raise SystemExit(f"{run}: no logs/version_*/metrics.csv with train/loss")
    return train, val


def windows(curve: dict[int, float], size: int) -> dict[int, float]:
    sums, counts = defaultdict(float), defaultdict(int)
    for step, loss in curve.items():
        sums[step // size] += loss
        counts[step // size] += 1
    return {w * size: sums[w] / counts[w] for w in sorted(sums)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs=2, type=Path)
    parser.add_argument("--window", type=int, default=50)
    args = parser.parse_args()
    (ta, va), (tb, vb) = (read_metrics(r) for r in args.runs)
    wa, wb = windows(ta, args.window), windows(tb, args.window)
    print(f"{'steps':>12} {'train A':>9} {'train B':>9} {'gap %':>7}")
    gaps = []
    for start in sorted(set(wa) & set(wb)):
        gap = 100 * (wb[start] - wa[start]) / wa[start]
        gaps.append(abs(gap))
        print(f"{start:>5}-{start + args.window - 1:<6} {wa[start]:9.4f} {wb[start]:9.4f} {gap:7.2f}")
    print(f"{'val step':>12} {'val A':>9} {'val B':>9} {'gap %':>7}")
    for step in sorted(set(va) & set(vb)):
        print(f"{step:>12} {va[step]:9.4f} {vb[step]:9.4f} {100 * (vb[step] - va[step]) / va[step]:7.2f}")
    print(f"A = {args.runs[0]}, B = {args.runs[1]}; largest windowed train-loss gap: {max(gaps):.2f}%")


if __name__ == "__main__":
    main()
