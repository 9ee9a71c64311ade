#!/usr/bin/env bash
# Submit launch/slurm.sbatch from the repo root; every argument is a Hydra override.
#
#   NODES=8 launch/submit.sh model=kimi_linear_48b_a3b parallel=a3b48_64_256gpu_h100 train.steps=10000
#   NODES=1 PARTITION=debug TIME=00:30:00 launch/submit.sh model=proxy parallel=tp2
#
# Environment (each maps to an sbatch option; unset ones keep slurm.sbatch's #SBATCH defaults):
#   NODES            --nodes
#   GPUS_PER_NODE    --gpus-per-node and --ntasks-per-node (one trainer process per GPU)
#   CPUS_PER_TASK    --cpus-per-task
#   TIME             --time (e.g. 04:00:00)
#   PARTITION        --partition
#   ACCOUNT          --account
#   QOS              --qos
#   JOB_NAME         --job-name (also names the log file and the default run directory)
#   SBATCH_EXTRA     more sbatch options, word-split (e.g. "--constraint=h100 --reservation=r1")
# plus every knob documented at the top of launch/slurm.sbatch (sbatch exports this environment).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/slurm_lib.sh
check_overrides "$@"
if ! command -v sbatch >/dev/null 2>&1; then
  echo "error: sbatch not found: this machine is not a slurm login node. On one machine use" \
    "launch/torchrun.sh; without slurm across machines, launch/deepspeed.sh" >&2
  exit 2
fi

opts=()
[ -n "${NODES:-}" ] && opts+=("--nodes=$NODES")
if [ -n "${GPUS_PER_NODE:-}" ]; then
  opts+=("--gpus-per-node=$GPUS_PER_NODE" "--ntasks-per-node=$GPUS_PER_NODE")
fi
[ -n "${CPUS_PER_TASK:-}" ] && opts+=("--cpus-per-task=$CPUS_PER_TASK")
[ -n "${TIME:-}" ] && opts+=("--time=$TIME")
[ -n "${PARTITION:-}" ] && opts+=("--partition=$PARTITION")
[ -n "${ACCOUNT:-}" ] && opts+=("--account=$ACCOUNT")
[ -n "${QOS:-}" ] && opts+=("--qos=$QOS")
[ -n "${JOB_NAME:-}" ] && opts+=("--job-name=$JOB_NAME")
# shellcheck disable=SC2206  # word splitting of SBATCH_EXTRA is the point
[ -n "${SBATCH_EXTRA:-}" ] && opts+=($SBATCH_EXTRA)

mkdir -p logs # sbatch does not create the directory of --output=logs/%x-%j.out
export DELTATRON_HOME=$PWD
exec sbatch "${opts[@]}" launch/slurm.sbatch "$@"
