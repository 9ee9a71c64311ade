#!/usr/bin/env bash
# One node: start deltatron.train on NPROC processes with torchrun; every argument is a Hydra
# override, passed through unchanged.
#
#   launch/torchrun.sh parallel=tp2 model=proxy train.steps=1000      # all visible GPUs
#   NPROC=4 launch/torchrun.sh parallel.tp=2 parallel.pp=2            # 4 processes (gloo on CPU)
#
# Environment:
#   NPROC                        processes (default: the visible GPUs, or 2 CPU processes)
#   PYTHON                       interpreter (default: .venv/bin/python, else python3)
#   CUDA_DEVICE_MAX_CONNECTIONS  1 by default: megatron-core's overlap of tensor-parallel
#                                communication with compute relies on kernel launch order
#   OMP_NUM_THREADS              1 by default, so CPU processes do not oversubscribe cores
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m deltatron.train "$@"
