"""How close is ``AllReduceSGD.sum_and_normalize_gradients`` to the least it can cost?

The floor: one in-place ``MPI.Allreduce`` on a numpy buffer of the same size plus one
in-place scale. Both are timed alternately in one run; the ratio (ours / floor, median of
pairs) is what to read (target <= 1.05). Run::

    mpiexec -n 2 python -m mpi4py benchmarks/allreduce_overhead.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import interleaved  # noqa: E402
from mpi4py import MPI  # noqa: E402

from mpi_easgd import AllReduceSGD  # noqa: E402
from mpi_easgd.models import ModelError, build_model  # noqa: E402

MODELS = [("lenet", (1, 28, 28)), ("resnet20", (3, 32, 32)), ("cifarnet", (3, 32, 32)),
          ("torchvision:resnet18", (3, 32, 32))]
PAIRS = 15


def measure(comm: MPI.Comm, model: torch.nn.Module, pairs: int) -> tuple[int, float, float, float]:
    """(parameters, ours s/call, floor s/call, median ratio) for one model."""
    sgd = AllReduceSGD(comm)
    sgd.synchronize_parameters(model)
    flat = sgd.flat(model)
    flat.grad.normal_()
    raw = np.random.default_rng(0).standard_normal(flat.numel + 1).astype(np.float32)

    def ours():
        sgd.sum_and_normalize_gradients(model)

    def floor():
        comm.Allreduce(MPI.IN_PLACE, raw, op=MPI.SUM)
        np.multiply(raw, 1.0 / comm.size, out=raw)

    repeats = max(5, int(2e8 / (flat.numel * 4 + 1e5)) // 4)
    return (flat.numel, *interleaved(comm, ours, floor, repeats=repeats, pairs=pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description="sum_and_normalize_gradients vs the floor")
    parser.add_argument("--models", nargs="+", default=[m for m, _ in MODELS], help="subset of models")
    parser.add_argument("--pairs", type=int, default=PAIRS, help="alternating timing pairs")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    torch.set_num_threads(1)
    if comm.rank == 0:
        print(f"{comm.size} ranks; time per call (median of {args.pairs} pairs); ratio = ours / floor")
        print(f"{'model':<22}{'params':>12}{'ours ms':>10}{'floor ms':>10}{'ratio':>8}")
    for name, shape in MODELS:
        if name not in args.models:
            continue
        try:
            model = build_model(name, shape, 10)
        except ModelError:
            continue  # torchvision absent
        numel, ours, floor, ratio = measure(comm, model, args.pairs)
        if comm.rank == 0:
            print(f"{name:<22}{numel:>12,}{ours * 1e3:>10.3f}{floor * 1e3:>10.3f}{ratio:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
