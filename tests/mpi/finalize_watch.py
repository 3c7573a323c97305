"""Under ``mpirun --with-ft ulfm -n 3``: ranks 0 and 1 end through the watched
``MPI_Finalize`` (:func:`mpi_easgd.runtime.ft.finalize_at_exit`) while rank 2 stays out
of it, as a dead process does for Open MPI's closing fence. Rank 2 prints how long its
peers' processes lived on, then leaves without finalizing (as the dead do)."""

import os  # noqa: I001 - mpi_easgd before mpi4py
import sys
import time

from mpi_easgd.runtime import ft  # first: the package applies the pre-MPI-init settings

from mpi4py import MPI

ft.FINALIZE_GRACE = float(sys.argv[1])
comm = MPI.COMM_WORLD
pids = comm.allgather(os.getpid())
comm.Barrier()
if comm.rank < 2:
    sys.exit(ft.finalize_at_exit(0))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"  # (a zombie has left)
    except (ProcessLookupError, FileNotFoundError):
        return False


start = time.monotonic()
while any(alive(p) for p in pids[:2]) and time.monotonic() - start < 4 * ft.FINALIZE_GRACE:
    time.sleep(0.1)
print(f"peers alive after {time.monotonic() - start:.1f}s: {any(alive(p) for p in pids[:2])}", flush=True)
os._exit(0)
