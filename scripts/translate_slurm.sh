#!/usr/bin/env bash
# `vis2ir translate` as a SLURM job array: each array task is one rank of the translation (one GPU each).
#
#   sbatch --array=0-15 scripts/translate_slurm.sh SOURCE --out OUT --checkpoint CK [more translate arguments]
#
# RANK is the task's index and WORLD_SIZE the array's size, so the tasks share the photos as torchrun's processes do
# (photo i goes to rank i mod WORLD_SIZE). A preempted task, requeued (--requeue below) or resubmitted with the same
# --array, continues from its manifest; the last task to finish writes the annotations and the card (or run
# `vis2ir translate SOURCE --out OUT --checkpoint CK --finalize` once all are done). Keep the array's size the same
# between submissions only to keep each task's share; any size is correct, since done photos are skipped by all.
#SBATCH --job-name=vis2ir-translate
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --requeue
#SBATCH --output=vis2ir-translate-%A_%a.log
set -euo pipefail
: "${SLURM_ARRAY_TASK_ID:?submit with sbatch --array=0-N (one task per rank)}"
export RANK=$SLURM_ARRAY_TASK_ID
export WORLD_SIZE=${SLURM_ARRAY_TASK_COUNT:?SLURM did not set SLURM_ARRAY_TASK_COUNT}
if [[ ${SLURM_ARRAY_TASK_MIN:-0} -ne 0 || $((SLURM_ARRAY_TASK_MAX - SLURM_ARRAY_TASK_MIN + 1)) -ne $WORLD_SIZE ]]; then
  echo "scripts/translate_slurm.sh: the array must be 0-N with no gaps (got ${SLURM_ARRAY_TASK_MIN}-${SLURM_ARRAY_TASK_MAX}, $WORLD_SIZE tasks)" >&2
  exit 2
fi
export LOCAL_RANK=0  # one GPU per task: cuda:0
exec "${PYTHON:-python3}" -m vis2ir.cli translate "$@"
