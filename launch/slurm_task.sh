#!/usr/bin/env bash
# One training process: what launch/slurm.sbatch runs in every srun task (one task per GPU).
#
# Maps slurm's task identity to the torch.distributed environment the trainer reads (RANK,
# LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE; MASTER_ADDR/MASTER_PORT come from the batch script),
# runs `python -m deltatron.train "$@"`, and records the process's exit code in
# $DELTATRON_ATTEMPT_DIR/exit_codes/rank<RANK>: the batch script reads these to tell a preempted
# run (exit 75 after saving a checkpoint) from a failure. The task's own exit code is the
# trainer's, except 75, reported to srun as 0 (see the end).
#
# slurm delivers its signals (SIGTERM on preemption or at the time limit, SIGUSR1 with
# --signal=USR1@<s>) to every process of the step, this shell included. Unhandled, either would
# kill this shell and lose the exit code; so it traps them, passes them on to the trainer (which
# saves at the next step boundary; a second copy of the same request is harmless) and keeps
# waiting until the trainer exits.
set -uo pipefail

: "${SLURM_PROCID:?slurm_task.sh runs inside srun (SLURM_PROCID is not set)}"
: "${DELTATRON_ATTEMPT_DIR:?set by launch/slurm.sbatch}"
export RANK=$SLURM_PROCID
export LOCAL_RANK=${SLURM_LOCALID:?SLURM_LOCALID is not set}
export WORLD_SIZE=${SLURM_NTASKS:?SLURM_NTASKS is not set}
export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-${DELTATRON_NPROC_PER_NODE:-1}}
PYTHON=${PYTHON:-python3}

"$PYTHON" -m deltatron.train "$@" &
child=$!
interrupted=0
forward() {
  interrupted=1
  kill -s "$1" "$child" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap 'forward INT' INT
while :; do
  interrupted=0
  wait "$child"
  rc=$?
  # A trapped signal interrupts wait (status > 128) while the trainer keeps running (saving a
  # checkpoint): wait again for its real exit status.
  [ "$interrupted" = 1 ] && [ "$rc" -gt 128 ] || break
done
mkdir -p "$DELTATRON_ATTEMPT_DIR/exit_codes"
echo "$rc" >"$DELTATRON_ATTEMPT_DIR/exit_codes/rank$RANK"
# Preempted (75): the checkpoint is saved and the batch script reads the code from the file.
# Reporting it to srun as a failure would make --kill-on-bad-exit kill the other ranks while
# they finish their own exit after the same checkpoint.
[ "$rc" -eq 75 ] && exit 0
exit "$rc"
