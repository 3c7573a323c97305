"""Compressed synchronous rounds in this process (one rank on ``MPI.COMM_SELF``): the
bytes they hand MPI. Their rule against a serial simulation, and the same bits on every
rank, run under mpiexec (``tests/mpi/spmd_collectives.py``, ``spmd_diloco.py``)."""

from __future__ import annotations

import copy

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


def fake_grad(step: int, n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(step))


@pytest.mark.parametrize("make", [
    lambda: AllReduceEA(MPI.COMM_SELF, 3, 0.4, exchange_dtype="int4"),
    lambda: AllReduceDiLoCo(MPI.COMM_SELF, 6, 0.7, exchange_dtype="topk", fragments=3, overlap_steps=1, mixing=0.5),
    lambda: AllReduceDiLoCo(MPI.COMM_SELF, 4, 0.7, exchange_dtype="int8", fragments=2)],
    ids=["ea-int4", "streaming-topk-overlapped", "streaming-int8"])
def test_a_checkpoint_mid_epoch_resumes_bit_for_bit(make):
    """What state_dict carries (center, residuals, each fragment's outer state, the round
    in flight landed first) is all a resumed object needs: both go on identically."""
    def steps(algo, model, start, stop):
        flat = algo.flat(model)
        for step in range(start, stop):
            flat.data.sub_(0.1 * fake_grad(step, flat.numel))
            algo.average_parameters(model)
        algo.synchronize_center(model)
        return algo.center.clone(), flat.data.clone()

    torch.manual_seed(0)
    model = torch.nn.Linear(300, 30)
    first = make()
    first.synchronize_parameters(model)
    flat = first.flat(model)
    for step in range(13):  # mid-period, a round in flight for the overlapped one
        flat.data.sub_(0.1 * fake_grad(step, flat.numel))
        first.average_parameters(model)
    state = copy.deepcopy(first.state_dict())
    x = flat.data.clone()
    went_on = steps(first, model, 13, 30)

    again_model = torch.nn.Linear(300, 30)
    again = make()
    again.synchronize_parameters(again_model)
    again.flat(again_model).data.copy_(x)
    again.load_state_dict(state)
    resumed = steps(again, again_model, 13, 30)
    assert torch.equal(went_on[0], resumed[0]) and torch.equal(went_on[1], resumed[1])


def test_a_round_in_flight_is_abandoned_and_residuals_forgotten_after_a_death():
    """What --on-rank-loss shrink does before it takes the furthest rank's state: no
    waiting on the dead communicator's round, and (on the others) no residual sent twice."""
    model = torch.nn.Linear(300, 30)
    algo = AllReduceDiLoCo(MPI.COMM_SELF, 6, exchange_dtype="int4", fragments=2, overlap_steps=2)
    algo.synchronize_parameters(model)
    flat = algo.flat(model)
    for step in range(4):  # a round started at step 3, due at 5
        flat.data.sub_(0.1 * fake_grad(step, flat.numel))
        algo.average_parameters(model)
    assert algo._due is not None
    owed = [r.gather.sender.residual.abs().sum() for r in algo._rounds_of()]
    assert max(owed) > 0
    algo.abandon()
    assert algo._due is None and algo.state_dict()["rounds"] == 0, "nothing landed"
    assert [r.gather.sender.residual.abs().sum() for r in algo._rounds_of()] == owed
    algo.abandon(keep_residuals=False)
    assert all(r.gather.sender.residual.abs().sum() == 0 for r in algo._rounds_of())
