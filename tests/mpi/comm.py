"""Helpers of the SPMD tests. The communicator they run on: ``MPI.COMM_WORLD``, or with
``MPI_EASGD_TEST_COMM=reversed`` a sub-communicator of the same processes in reverse rank
order (``Split``), which catches code that assumes ``COMM_WORLD`` or that its rank 0 is the
world's rank 0. And :func:`one_side_fails_all`, for tests whose ranks play different parts."""

from __future__ import annotations

import functools
import os
import time
import traceback

from mpi4py import MPI


def one_side_fails_all(test):
    """A failure on one rank must end the job (with its traceback), not leave the others
    waiting for it."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        try:
            test(*args, **kwargs)
        except BaseException:
            rank = MPI.COMM_WORLD.Get_rank()
            os.write(2, f"rank {rank}: {traceback.format_exc()}".encode())  # past pytest's capture
            time.sleep(0.3)  # the launcher may drop a line written just before the abort
            MPI.COMM_WORLD.Abort(1)
    return run


def comm_under_test() -> MPI.Comm:
    world = MPI.COMM_WORLD
    if os.environ.get("MPI_EASGD_TEST_COMM") == "reversed":
        return world.Split(color=0, key=world.Get_size() - 1 - world.Get_rank())
    return world


def sent_with_feedback(codec, message, residual):
    """What a compressed message with error feedback delivers, written from the rule:
    ``(decoded (message + residual), the new residual)``."""
    from mpi_easgd import compress

    owed = message + residual
    buf = compress.message_buffer(codec, len(owed))
    codec.encode(owed, buf)
    sent = codec.decode(buf, owed.new_empty(owed.shape))
    return sent, owed - sent
