"""The communicator the SPMD tests run on: ``MPI.COMM_WORLD``, or with
``MPI_EASGD_TEST_COMM=reversed`` a sub-communicator of the same processes in reverse rank
order (``Split``), which catches code that assumes ``COMM_WORLD`` or that its rank 0 is the
world's rank 0."""

from __future__ import annotations

import os

from mpi4py import MPI


def comm_under_test() -> MPI.Comm:
    world = MPI.COMM_WORLD
    if os.environ.get("MPI_EASGD_TEST_COMM") == "reversed":
        return world.Split(color=0, key=world.Get_size() - 1 - world.Get_rank())
    return world
