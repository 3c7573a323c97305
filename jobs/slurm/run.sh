#!/usr/bin/env bash
# Run one mpi_easgd training step inside a SLURM allocation (called by the jobs/*.sbatch scripts).
#
# Environment (all optional):
#   CONFIG    TOML config (default jobs/configs/mnist_easgd.toml); every algorithm has one
#   ARGS      extra flags for python -m mpi_easgd.train (e.g. "--epochs 5 --device cuda")
#   LAUNCHER  srun (PMI-2, default), mpirun (the environment's mpiexec inside the allocation), or
#             mpirun-ft (Open MPI's mpirun --with-ft ulfm: fault-tolerant runs; ULFM has no srun launch)
#   RANKS     ranks to start (default: SLURM_NTASKS; mpirun-ft leaves tasks over for replacements)
#   OUT       parent of the run directory (default $SLURM_SUBMIT_DIR/runs)
#   PYTHON    the interpreter with mpi_easgd installed (default python)
#
# The run directory is OUT/JOBNAME-JOBID, stable across requeues, and every start passes
# --resume auto: the first start trains from scratch, a requeued one continues.
# Preemption: SLURM's warning signal (#SBATCH --signal=B:USR1@120) or SIGTERM reaches this
# script; it is forwarded to the training step, which writes a checkpoint and exits with 75;
# the script then requeues the job (needs #SBATCH --requeue).
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
CONFIG=${CONFIG:-jobs/configs/mnist_easgd.toml}
LAUNCHER=${LAUNCHER:-srun}
OUT=${OUT:-${SLURM_SUBMIT_DIR:-.}/runs}
PYTHON=${PYTHON:-python}
RUN_NAME="${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID:-local}"
read -r -a extra <<< "${ARGS:-}"
train=("$PYTHON" -m mpi_easgd.train --config "$CONFIG" --out "$OUT" --run-name "$RUN_NAME"
       --resume auto --no-progress "${extra[@]}")

started=$(mktemp)  # (a summary newer than this was written by this start)
echo "mpi_easgd: job ${SLURM_JOB_ID:-?} start ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}, ${SLURM_NTASKS:-?} tasks, launcher $LAUNCHER"
case "$LAUNCHER" in
  srun)   srun --mpi=pmi2 --kill-on-bad-exit=1 "${train[@]}" & ;;
  mpirun) mpiexec -n "${RANKS:-${SLURM_NTASKS:?}}" "${train[@]}" & ;;
  mpirun-ft) mpirun --with-ft ulfm -n "${RANKS:-${SLURM_NTASKS:?}}" "${train[@]}" & ;;
  *)      echo "mpi_easgd: LAUNCHER must be srun, mpirun or mpirun-ft, got '$LAUNCHER'" >&2; exit 2 ;;
esac
step=$!
forward() { echo "mpi_easgd: got $1, asking the training step to checkpoint and stop"; kill -USR1 "$step" 2>/dev/null; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# `wait` returns early when a trapped signal arrives: keep waiting for the step itself.
while true; do
  wait "$step"; rc=$?
  kill -0 "$step" 2>/dev/null || break
done
# Open MPI's mpirun exits 137 when a process it spawned (a replacement worker) was killed,
# even though the run went on and completed: the run's own summary tells the truth.
if [ "$LAUNCHER" = mpirun-ft ] && [ "$rc" -eq 137 ] && [ "$OUT/$RUN_NAME/summary.json" -nt "$started" ]; then
  echo "mpi_easgd: mpirun exited 137 because a replacement worker it spawned was killed; the run completed" \
       "($OUT/$RUN_NAME/summary.json), exit status 0"
  rc=0
fi
rm -f "$started"
if [ "$rc" -eq 75 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "mpi_easgd: checkpoint written; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
