"""AllReduceSGD: synchronous data-parallel SGD with one Allreduce per step.

Usage (the seed's API in snake_case)::

    sgd = AllReduceSGD(comm)
    sgd.synchronize_parameters(model)       # everyone starts from rank 0's model
    for batch in shard:
        loss_fn(model(x), y).backward()
        sgd.sum_and_normalize_gradients(model)
        optimizer.step()
    sgd.synchronize_parameters(model)       # before validating

The contributor count rides in one extra float32 slot after the gradients, inside the
same Allreduce: a rank that has run out of data calls with ``has_data=False`` (zeros and a
count of 0) until every rank is out (the call then returns 0).
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI
from torch import nn

from mpi_easgd.algorithms._common import FlatCache, argmax_rank, bcast_module_state
from mpi_easgd.flat import FlatParameters


class AllReduceSGD:
    """Sum (and average) gradients across ``comm`` with one in-place Allreduce per step."""

    def __init__(self, comm: MPI.Comm, *, transfer: str = "auto") -> None:
        """``transfer``: ``auto``, ``direct`` or ``staged`` (see :mod:`mpi_easgd.transfer`)."""
        self.comm = comm
        self.steps = 0  # steps with data since the last synchronize_parameters
        self._cache = FlatCache(grad_extra=1, transfer=transfer)

    def synchronize_parameters(self, model: nn.Module) -> int:
        """Give every rank the parameters of the rank that took the most steps with data
        since the last call (rank 0 before training; ties go to the lowest rank).

        Returns the rank whose parameters were kept.
        """
        flat = self._cache.get(model)
        flat.check_views()
        root = argmax_rank(self.comm, self.steps)
        bcast_module_state(self.comm, model, self._cache.data, root)
        self.steps = 0
        return root

    def sum_gradients(self, model: nn.Module, has_data: bool = True) -> int:
        """Sum every rank's gradients in place; returns how many ranks contributed."""
        flat = self._cache.get(model)
        buf = self._cache.grad
        if has_data:
            flat.gather_grads()
        else:
            flat.zero_grad()
        buf.before_send()
        buf.mpi[-1] = 1.0 if has_data else 0.0
        self.comm.Allreduce(MPI.IN_PLACE, buf.mpi, op=MPI.SUM)
        buf.after_recv()
        if has_data:
            self.steps += 1
        return int(buf.mpi[-1])

    def sum_and_normalize_gradients(self, model: nn.Module, has_data: bool = True) -> int:
        """Average gradients over the ranks that contributed data this round.

        Returns that count; 0 means every rank is out of data (the gradients are zero).
        """
        count = self.sum_gradients(model, has_data)
        if count > 1:
            grad = self._cache.flat.grad
            if self._cache.grad.mode == "direct" and grad.device.type == "cpu":  # numpy skips ~5 us of torch dispatch
                np.multiply(self._cache.grad.mpi, 1.0 / count, out=self._cache.grad.mpi)
            else:
                grad.mul_(1.0 / count)
        return count

    def flat(self, model: nn.Module) -> FlatParameters:
        """The flat parameter/gradient buffers of ``model`` (built on first use)."""
        return self._cache.get(model)

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
