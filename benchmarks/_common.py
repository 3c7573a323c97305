"""Helpers for the benchmark scripts (run them under mpiexec; they print ratios)."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from mpi4py import MPI


def mpiexec() -> str:
    """The mpiexec next to this Python (the venv's MPI), else the one on PATH."""
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else "mpiexec"


def timed(comm: MPI.Comm, fn, repeats: int) -> float:
    """Seconds per call of ``fn`` over ``repeats`` calls, slowest rank (barrier-aligned)."""
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    elapsed = time.perf_counter() - start
    return comm.allreduce(elapsed, op=MPI.MAX) / repeats


def interleaved(comm: MPI.Comm, a, b, repeats: int, pairs: int) -> tuple[float, float, float]:
    """Time ``a`` and ``b`` alternately ``pairs`` times; returns the medians of a, b and a/b."""
    ta, tb = [], []
    for i in range(pairs):
        first, second = (a, b) if i % 2 == 0 else (b, a)  # alternate who goes first
        t1, t2 = timed(comm, first, repeats), timed(comm, second, repeats)
        ta.append(t1 if i % 2 == 0 else t2)
        tb.append(t2 if i % 2 == 0 else t1)
    ratios = [x / y for x, y in zip(ta, tb)]
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)
