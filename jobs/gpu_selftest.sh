#!/usr/bin/env bash
# GPU self-test for a GPU node (or an allocation: srun -N1 -n2 --gpus-per-task=1 jobs/gpu_selftest.sh).
# 1. collectives on CUDA tensors through every transfer path, parameter equality, bandwidth;
# 2. every algorithm for a few steps with --device cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
RANKS=${RANKS:-2}
MPIEXEC=${MPIEXEC:-mpiexec}
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_selftest: no CUDA device is visible to torch here; run it on a GPU node (srun --gpus-per-task=1 ...)" >&2
  exit 2
fi
$MPIEXEC -n "$RANKS" python -m mpi4py jobs/gpu_selftest.py
OUT=$(mktemp -d)
for algo in sgd ea; do
  $MPIEXEC -n "$RANKS" python -m mpi_easgd.train --algo "$algo" --device cuda --epochs 1 --no-progress --out "$OUT" | tail -3
done
for algo in easgd eamsgd downpour; do
  $MPIEXEC -n $((RANKS + 2)) python -m mpi_easgd.train --algo "$algo" --device cuda --epochs 1 --no-progress --out "$OUT" | tail -3
done
# compressed exchanges on the GPU: sync streaming DiLoCo in int4, async DiLoCo in top-k, both directions
$MPIEXEC -n "$RANKS" python -m mpi_easgd.train --algo diloco --fragments 2 --overlap-steps 2 --exchange-dtype int4 \
  --device cuda --epochs 1 --no-progress --out "$OUT" | tail -3
$MPIEXEC -n $((RANKS + 2)) python -m mpi_easgd.train --algo async-diloco --exchange-dtype topk --outer-momentum 0.5 \
  --device cuda --epochs 1 --no-progress --out "$OUT" | tail -3
echo "all algorithms ran on the GPU; run directories in $OUT"
