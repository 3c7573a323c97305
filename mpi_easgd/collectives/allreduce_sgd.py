"""AllReduceSGD: synchronous data-parallel SGD with one Allreduce per step.

Usage (the seed's API in snake_case)::

    sgd = AllReduceSGD(comm)
    sgd.synchronize_parameters(model)       # everyone starts from rank 0's model
    for epoch in range(epochs):
        for batch in my_shard:              # shards may have different numbers of batches
            loss_fn(model(x), y).backward()
            sgd.sum_and_normalize_gradients(model)
            optimizer.step()
        sgd.synchronize_parameters(model)   # finishes the epoch; before validating

With ``AllReduceSGD(comm, overlap=True)`` the same sums run bucket by bucket while backward
is still computing the earlier layers' gradients (:mod:`mpi_easgd.collectives.overlap`);
the calls stay the same, one backward per ``sum_and_normalize_gradients``.

The contributor count rides in one extra float32 slot after the gradients, inside the
same Allreduce. Uneven endings follow the seed's contract: a rank that reaches
``synchronize_parameters`` while others still step keeps joining their Allreduces with
zeros and a count of 0 until a round in which every rank has arrived (count 0); then the
parameters of the rank that took the most steps are given to every rank. An explicit
``has_data=False`` call (returns 0 once every rank is out) is an optional extra.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI
from torch import nn

from mpi_easgd.collectives.base import Collective, FlatCache, argmax_rank, bcast_module_state
from mpi_easgd.collectives.overlap import BucketReducer
from mpi_easgd.collectives.rounds import ring_bytes
from mpi_easgd.flat import FlatParameters
from mpi_easgd.runtime.watchdog import CollectiveGuard, require_thread_multiple
from mpi_easgd.transfer import allreduce, chunk_size


class AllReduceSGD(Collective):
    """Sum (and average) gradients across ``comm`` with one in-place Allreduce per step.

    ``transfer``: ``auto``, ``direct`` or ``staged`` (see :mod:`mpi_easgd.transfer`).
    ``chunk_bytes``: the reduction's piece size (:func:`mpi_easgd.transfer.chunk_size`; the
    same on every rank).
    ``overlap``: start each bucket's reduction from gradient hooks during backward (buckets
    of ``chunk_bytes`` in reverse parameter order); ``sum_and_normalize_gradients`` then
    only finishes them. Same results; needs one backward per step.
    ``timeout``: seconds a call may wait for the other ranks before one line says which call
    and that the ranks' calls do not match (``None``: never); ``on_timeout="abort"`` then
    also ends the job (the command line does), ``"warn"`` keeps waiting.
    """

    def __init__(self, comm: MPI.Comm, *, transfer: str = "auto", timeout: float | None = 300.0,
                 on_timeout: str = "warn", chunk_bytes: int | None = None, overlap: bool = False) -> None:
        self.comm = comm
        self.chunk_bytes = chunk_size(chunk_bytes)
        self.overlap = overlap
        self._reducer: BucketReducer | None = None
        self.steps = 0  # steps with data since the last synchronize_parameters
        self._cache = FlatCache(grad_extra=1, transfer=transfer)
        self._guard = CollectiveGuard(comm, "AllReduceSGD", timeout, on_timeout)

    @classmethod
    def from_config(cls, comm: MPI.Comm, cfg, **options) -> AllReduceSGD:
        """As the command line builds it from a :class:`~mpi_easgd.config.Config`."""
        return cls(comm, **options)

    def synchronize_parameters(self, model: nn.Module) -> int:
        """Finish the epoch, then give every rank the parameters (frozen ones included) and
        buffers of the rank that took the most steps with data since the last call (rank 0
        before training; ties go to the lowest rank); reset the step counter.

        Finishing the epoch: until every rank has arrived here, join the gradient
        Allreduces of the ranks still stepping, with zeros and a count of 0.
        Returns the rank whose parameters were kept.
        """
        with self._guard("synchronize_parameters"):
            flat = self.flat(model)
            flat.check_views()
            while self._allreduce(flat, has_data=False):
                pass
            root = argmax_rank(self.comm, self.steps)
            bcast_module_state(self.comm, model, self._cache.data, root)
            self.steps = 0
            return root

    def sum_gradients(self, model: nn.Module, has_data: bool = True) -> int:
        """Sum every rank's gradients in place; returns how many ranks contributed."""
        with self._guard("sum_gradients"):
            return self._allreduce(self.flat(model), has_data)

    def sum_and_normalize_gradients(self, model: nn.Module, has_data: bool = True) -> int:
        """Average gradients over the ranks that contributed data this round.

        Returns that count; 0 means every rank is out of data (the gradients are zero).
        """
        with self._guard("sum_and_normalize_gradients"):
            count = self._allreduce(self.flat(model), has_data)
        if count > 1:
            grad = self._cache.flat.grad
            if self._cache.grad.mode == "direct" and grad.device.type == "cpu":  # numpy skips ~5 us of torch dispatch
                np.multiply(self._cache.grad.mpi, 1.0 / count, out=self._cache.grad.mpi)
            else:
                grad.mul_(1.0 / count)
        return count

    def _allreduce(self, flat: FlatParameters, has_data: bool) -> int:
        """One round: this rank's gradients (zeros without data) and its count, summed."""
        if has_data:
            self.steps += 1
        self.all_rounds += 1
        started = time.perf_counter()
        if self._reducer is not None:
            count = self._reducer.finish(has_data)
        else:
            buf = self._cache.grad
            if has_data:
                flat.gather_grads()
            else:
                flat.zero_grad()
            buf.before_send()
            buf.mpi[-1] = 1.0 if has_data else 0.0
            allreduce(self.comm, buf, self.chunk_bytes)
            buf.after_recv()
            count = int(buf.mpi[-1])
        link = self._link()
        if link is not None:  # an emulated slow network
            link.wait(started, ring_bytes(self.bytes_per_round, self.comm.Get_size()))
        return count

    def flat(self, model: nn.Module) -> FlatParameters:
        """The flat parameter/gradient buffers of ``model`` (built on first use; with
        ``overlap=True`` the gradient hooks are registered then)."""
        flat = self._cache.get(model)
        if self.overlap and self._reducer is None:
            if flat.device.type != "cpu":  # autograd runs a GPU model's hooks on a thread of its own
                require_thread_multiple("AllReduceSGD(overlap=True) on a GPU model (autograd calls the gradient "
                                        "hooks, which start the reductions, from its device thread)")
            self._reducer = BucketReducer(self.comm, flat, self._cache.transfer, self.chunk_bytes)
        return flat

    def round_bytes(self) -> tuple[int, int]:
        sent = self._cache.grad.sent.numel() * self._cache.grad.sent.element_size()  # one gradient Allreduce
        return sent, sent

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
