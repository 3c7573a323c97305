"""What a 16-bit or compressed exchange costs the synchronous elastic algorithms, against float32.

For each parameter count, one elastic round of ``AllReduceEA`` (tau 1: every
``average_parameters`` call is a round) and one outer round of ``AllReduceDiLoCo``,
with ``exchange_dtype`` float32 and float16/bfloat16 (or int8, int4, topk), timed
alternately in one run; prints seconds per round and the ratio format / float32 (median of
pairs; below 1: faster). Run::

    mpiexec -n 2 python -m mpi4py benchmarks/exchange_dtype.py
    mpiexec -n 2 python -m mpi4py benchmarks/exchange_dtype.py --dtypes int8 int4 topk
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import interleaved  # noqa: E402
from mpi4py import MPI  # noqa: E402
from torch import nn  # noqa: E402

from mpi_easgd import AllReduceDiLoCo, AllReduceEA  # noqa: E402


def one_round(cls, comm: MPI.Comm, n: int, dtype: str):
    model = nn.Linear(n, 1, bias=False)
    algo = cls(comm, 1, 0.3, exchange_dtype=dtype) if cls is AllReduceEA else cls(comm, 1, exchange_dtype=dtype)
    algo.synchronize_parameters(model)
    return lambda: algo.average_parameters(model)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 11e6], help="parameters")
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    torch.manual_seed(comm.rank)
    if comm.rank == 0:
        print(f"{comm.size} ranks; seconds per round, median of {args.pairs} alternating pairs")
        print(f"{'algorithm':>16}{'parameters':>12}{'dtype':>10}{'format':>10}{'float32':>10}{'ratio':>8}")
    for cls in (AllReduceEA, AllReduceDiLoCo):
        for size in args.sizes:
            n = int(size)
            repeats = max(3, int(2e8 / (n * 4)) // 4)
            for dtype in args.dtypes:
                narrow, wide = one_round(cls, comm, n, dtype), one_round(cls, comm, n, "float32")
                t16, t32, ratio = interleaved(comm, narrow, wide, repeats=repeats, pairs=args.pairs)
                if comm.rank == 0:
                    print(f"{cls.__name__:>16}{n:>12,}{dtype:>10}{t16 * 1e3:>9.2f}m{t32 * 1e3:>9.2f}m{ratio:>8.3f}",
                          flush=True)


if __name__ == "__main__":
    main()
