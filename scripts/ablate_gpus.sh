#!/usr/bin/env bash
# Run one `vis2ir ablate` over every GPU of this machine, several runs side by side on each.
#
#   scripts/ablate_gpus.sh RUNS_PER_GPU ABLATE_ARGS...
#   scripts/ablate_gpus.sh 4 --config configs/ablation.yaml --plan configs/plans/ablation_modes.yaml \
#       --seeds 0,1 --out runs/ablation
#
# GPUs × RUNS_PER_GPU processes each take every n-th variant (`--shard i/n`), one GPU each
# (CUDA_VISIBLE_DEVICES); a small from-scratch model leaves an H100 mostly idle, so several runs per
# GPU finish sooner than one after another. Logs: OUT/logs/shard-i.log. Finished variants are
# skipped, so rerunning the same command resumes. Ends with the table (`--collect`).
# The interpreter is $PYTHON (default python3, the one holding torch and vis2ir).
set -euo pipefail
py=${PYTHON:-python3}
per_gpu=${1:?usage: scripts/ablate_gpus.sh RUNS_PER_GPU ABLATE_ARGS...}
shift
out=runs/ablate
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do [[ ${args[i]} == --out ]] && out=${args[i + 1]}; done
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
if [[ $gpus -lt 1 ]]; then echo "scripts/ablate_gpus.sh: no GPU found (nvidia-smi -L lists none)" >&2; exit 1; fi
n=$((gpus * per_gpu))
# Each process gets its share of the CPU cores for its threads, not every core (torch's default).
threads=$(( $(nproc) / n ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
mkdir -p "$out/logs"
pids=()
for ((i = 0; i < n; i++)); do
  CUDA_VISIBLE_DEVICES=$((i % gpus)) "$py" -m vis2ir.cli ablate "$@" --shard "$i/$n" > "$out/logs/shard-$i.log" 2>&1 &
  pids+=($!)
done
echo "$n processes on $gpus GPUs ($OMP_NUM_THREADS CPU threads each), logs in $out/logs/"
failed=0
for ((i = 0; i < n; i++)); do wait "${pids[i]}" || { echo "shard $i/$n failed: $out/logs/shard-$i.log" >&2; failed=1; }; done
"$py" -m vis2ir.cli ablate "$@" --collect
exit $failed
