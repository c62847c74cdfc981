"""The second half of the first table's plan: the adapter's settings around the best cross-attention row.

Reads an ablation's `results.csv` (after `configs/plans/ablation_modes.yaml` ran), takes the
cross-attention row with the highest mean PSNR, and prints a plan (YAML, for `vis2ir ablate --plan`)
that varies, one at a time, the adapter's learning rate (×10 and ×100 the backbone's 3e-4; ×1 is
the row itself), `scale_init` 0.1 (0 is the row itself), layers 2 and 3, and heads 4 and 16.

    python scripts/ablation_adapter_plan.py runs/ablation/results.csv > runs/ablation/adapter_plan.yaml
"""

from __future__ import annotations

import argparse
import csv
import sys

VARIED = (("train.adapter_learning_rate", "[3.0e-3, 3.0e-2]"), ("model.semantic.scale_init", "[0.1]"),
          ("model.semantic.num_layers", "[2, 3]"), ("model.semantic.num_heads", "[4, 16]"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_csv")
    args = parser.parse_args()
    try:
        rows = list(csv.DictReader(open(args.results_csv)))
    except OSError as err:
        sys.stderr.write(f"{args.results_csv}: cannot read it ({err})\n")
        return 1
    rows = [r for r in rows if r["row"].startswith("mode=cross_attention__position=") and r["psnr"] not in ("", "nan")]
    if not rows:
        sys.stderr.write(f"{args.results_csv}: no finished cross-attention row (run configs/plans/ablation_modes.yaml first)\n")
        return 1
    best = max(rows, key=lambda r: float(r["psnr"]))
    settings = dict(part.split("=", 1) for part in best["row"].split("__"))
    base = (f"  model.semantic.mode: cross_attention\n  model.semantic.position: {settings['position']}\n"
            f"  model.semantic.inject_into: {settings['inject_into']}\n")
    print(f"# The adapter's settings around the best cross-attention row: {best['row']}\n"
          f"# (highest mean PSNR in {args.results_csv}: {float(best['psnr']):.2f} dB)")
    for key, values in VARIED:
        print(f"-\n{base}  {key}: {values}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
