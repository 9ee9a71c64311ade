#!/usr/bin/env bash
# Several machines without slurm: start deltatron.train on every GPU of the hosts in an MPI-style
# hostfile with DeepSpeed's launcher (ssh/pdsh by default). Only the launcher is DeepSpeed's: each
# process is the same megatron-core trainer, reading the RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/
# MASTER_PORT environment the launcher sets. Every argument is a Hydra override, passed through.
#
#   HOSTFILE=hostfile launch/deepspeed.sh model=kimi_linear_48b_a3b parallel=a3b48_16gpu_h200
#   NUM_GPUS=4 launch/deepspeed.sh parallel=tp2                   # this machine only, 4 GPUs
#
# hostfile: one line per machine, "<host> slots=<GPUs>", e.g. "node1 slots=8"; the first host is
# the rendezvous host. The repo must be at the same path on every machine (shared filesystem):
# DeepSpeed runs `cd <this repo>; python -m deepspeed.launcher.launch ...` there over ssh.
# Needs DeepSpeed on every machine: pip install -e '.[deepspeed]' (the `deepspeed` extra).
# For one machine without DeepSpeed use launch/torchrun.sh (also CPU); with slurm, launch/submit.sh.
#
# Environment:
#   HOSTFILE                     the hostfile (default: none, this machine's GPUs)
#   NUM_NODES                    use the first N hosts of the hostfile (default: all)
#   NUM_GPUS                     GPUs per host, ids 0..N-1 (default: each host's slots)
#   MASTER_ADDR                  rendezvous address (default: DeepSpeed asks the first host
#                                over ssh for `hostname -I`; 127.0.0.1 on one machine)
#   MASTER_PORT                  rendezvous port (default 29500)
#   DS_LAUNCHER                  DeepSpeed's multi-node backend: pdsh (default), openmpi,
#                                mvapich, mpich, impi, slurm
#   DEEPSPEED                    the deepspeed command (default: .venv/bin/deepspeed, else
#                                deepspeed on PATH)
#   CUDA_DEVICE_MAX_CONNECTIONS  1 by default (megatron-core's communication overlap needs it)
#   OMP_NUM_THREADS              1 by default
# DeepSpeed forwards only some variables to other hosts (NCCL_*, PYTHON*, UCX_*, ...); this
# script writes the ones the trainer needs (the two above, TORCH_NCCL_*, WANDB_*, HF_*,
# DELTATRON_*) into a file DeepSpeed exports on every host (DS_ENV_FILE).
#
# Exit code: the trainers'; 75 means preempted with a checkpoint saved (SIGTERM/SIGUSR1): run the
# same command again to resume (train.resume=auto; give train.run_dir so both runs share it).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/slurm_lib.sh # check_overrides
check_overrides "$@"

DEEPSPEED=${DEEPSPEED:-}
if [ -z "$DEEPSPEED" ]; then
  if [ -x .venv/bin/deepspeed ]; then DEEPSPEED=.venv/bin/deepspeed; else DEEPSPEED=deepspeed; fi
fi
if ! command -v "$DEEPSPEED" >/dev/null 2>&1; then
  echo "error: DeepSpeed's launcher '$DEEPSPEED' is not installed: pip install -e '.[deepspeed]'" \
    "(the deepspeed extra), or set DEEPSPEED=/path/to/deepspeed" >&2
  exit 2
fi

ds_args=()
if [ -n "${HOSTFILE:-}" ]; then
  if [ ! -f "$HOSTFILE" ]; then
    # DeepSpeed would silently fall back to this machine alone
    echo "error: HOSTFILE=$HOSTFILE does not exist (expected lines like 'node1 slots=8')" >&2
    exit 2
  fi
  bad=$(grep -nEv '^[[:space:]]*(#.*)?$|^[[:space:]]*[^[:space:]]+[[:space:]]+slots=[0-9]+[[:space:]]*$' "$HOSTFILE" || true)
  if [ -n "$bad" ]; then
    echo "error: HOSTFILE=$HOSTFILE has lines that are not '<host> slots=<GPUs>': $bad" >&2
    exit 2
  fi
  ds_args+=(--hostfile "$(realpath "$HOSTFILE")" --launcher "${DS_LAUNCHER:-pdsh}")
fi
for pair in "NUM_NODES:--num_nodes" "NUM_GPUS:--num_gpus"; do
  var=${pair%%:*} flag=${pair#*:}
  value=${!var:-}
  if [ -n "$value" ]; then
    case $value in
      *[!0-9]* | 0) echo "error: $var=$value must be a positive integer" >&2; exit 2 ;;
    esac
    ds_args+=("$flag" "$value")
  fi
done
[ -n "${MASTER_ADDR:-}" ] && ds_args+=(--master_addr "$MASTER_ADDR")
ds_args+=(--master_port "${MASTER_PORT:-29500}")

export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DS_ENV_FILE=$(mktemp "${TMPDIR:-/tmp}/deltatron-deepspeed-env.XXXXXX")
export DS_ENV_FILE
trap 'rm -f "$DS_ENV_FILE"' EXIT
env | grep -E '^(CUDA_DEVICE_MAX_CONNECTIONS|OMP_NUM_THREADS|TORCH_NCCL_[A-Z_]*|WANDB_[A-Z_]*|HF_[A-Z_]*|DELTATRON_[A-Z_]*)=' \
  | grep -v '^DS_ENV_FILE=' >"$DS_ENV_FILE" || true

# --module: run `python -m deltatron.train` (the package entry point) on every GPU.
# --no_local_rank: DeepSpeed would otherwise append --local_rank=N, which is not a Hydra
# override; the trainer reads LOCAL_RANK from the environment.
set +e
"$DEEPSPEED" "${ds_args[@]}" --no_local_rank --module deltatron.train "$@"
rc=$?
set -e
if [ "$rc" -eq 75 ]; then
  echo "deltatron deepspeed: preempted, checkpoint saved; run the same command again to resume" >&2
fi
exit "$rc"
