"""Compressed synchronous rounds in this process (one rank on ``MPI.COMM_SELF``): the
bytes they hand MPI. Their rule against a serial simulation, and the same bits on every
rank, run under mpiexec (``tests/mpi/spmd_collectives.py``, ``spmd_diloco.py``)."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from mpi_easgd import AllReduceDiLoCo, AllReduceEA


class CountingComm:
    """A communicator that counts the bytes of every buffer handed to MPI."""

    def __init__(self, comm):
        self.comm, self.sent = comm, 0

    def __getattr__(self, name):
        attr = getattr(self.comm, name)
        if name in ("Allreduce", "Iallreduce", "Allgather", "Iallgather", "Bcast", "Send", "Isend", "Sendrecv"):
            def counted(*args, **kwargs):
                buf = args[1] if args[0] is MPI.IN_PLACE else args[0]
                self.sent += buf.nbytes
                return attr(*args, **kwargs)
            return counted
        return attr


@pytest.mark.parametrize("make", [lambda c, dtype: AllReduceEA(c, 1, 0.5, exchange_dtype=dtype),
                                  lambda c, dtype: AllReduceDiLoCo(c, 1, 0.5, exchange_dtype=dtype)],
                         ids=["ea", "diloco"])
def test_bytes_handed_to_mpi_per_round(make):
    """What one round hands MPI, counted at the communicator, against float32's."""
    sent = {}
    for dtype in ("float32", "int4", "topk"):
        model = torch.nn.Linear(1000, 300)  # 300,300 parameters
        comm = CountingComm(MPI.COMM_SELF)
        algo = make(comm, dtype)
        algo.synchronize_parameters(model)
        comm.sent = 0
        with torch.no_grad():
            model.weight.add_(0.01)
        algo.average_parameters(model)
        sent[dtype] = comm.sent
        assert sent[dtype] == algo.bytes_per_round
    assert sent["int4"] / sent["float32"] <= (4 + 16 / 256) / 32 + 5e-4  # 4 bits, the block scales, a last block
    assert sent["topk"] / sent["float32"] <= 1 / 50
