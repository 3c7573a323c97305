"""AllReduceEA: synchronous elastic averaging (synchronous EASGD, beta = p * alpha).

Every rank keeps an identical copy of the center ``c``. Every ``tau``-th call of
:meth:`AllReduceEA.average_parameters` (after the local optimizer step)::

    d_i = alpha * (x_i - c);  x_i -= d_i;  D = Allreduce_SUM(d_i);  c += D

Uneven endings follow the seed's contract: :meth:`AllReduceEA.synchronize_center`, called
by every rank after its epoch, finishes the epoch itself. A rank that arrives there keeps
taking part in the elastic rounds of the ranks still stepping (sending its real ``d_i``
and moving toward the center) until a round in which no rank is still stepping; a flag in
one extra slot of the same Allreduce says which ranks still step. Then rank 0's center is
broadcast and the step counter reset.

``exchange_dtype="float16"`` or ``"bfloat16"`` sends ``d_i`` in that type (half the bytes);
``x_i`` and ``c`` stay float32 and each rank moves by its own exact ``d_i``, while ``c``
takes the sum as it arrived (added in float32 at every step of the reduction, rounded once
each time). ``"int8"``, ``"int4"`` or ``"topk"`` (:mod:`mpi_easgd.compress`) send ``d_i`` plus
what this rank's earlier messages left out (error feedback); the round is then an
Allgather and a sum in rank order (:mod:`.compressed`), so every rank's center stays
bitwise the same.
"""

from __future__ import annotations

import torch
from mpi4py import MPI
from torch import nn

from mpi_easgd.collectives.base import (
    FlatCache,
    PeriodicRounds,
    bcast_module_state,
    bcast_tensor,
)
from mpi_easgd.flat import FlatParameters, flat_like
from mpi_easgd.rules.elastic import ea_local_move
from mpi_easgd.runtime.watchdog import CollectiveGuard
from mpi_easgd.transfer import chunk_size


def check_tau_alpha(tau: int, alpha: float) -> None:
    """Reject a communication period or elastic coefficient outside its range."""
    if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
        raise ValueError(f"tau must be an integer >= 1 (local steps between exchanges); got {tau!r}")
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be in (0, 1) (the elastic coefficient); got {alpha!r}")


class AllReduceEA(PeriodicRounds):
    """Synchronous elastic averaging over ``comm`` every ``tau`` steps with coefficient ``alpha``.

    ``exchange_dtype``: float32, float16, bfloat16, int8, int4 or topk on the wire (module
    docstring), ``topk_fraction`` the share of entries topk sends; ``error_feedback=False``
    drops what a compressed message left out (only to see what feedback is for).
    ``chunk_bytes``: the reduction's piece size (:func:`mpi_easgd.transfer.chunk_size`).
    ``transfer``, ``timeout`` and ``on_timeout`` as for
    :class:`~mpi_easgd.collectives.allreduce_sgd.AllReduceSGD`.
    """

    def __init__(self, comm: MPI.Comm, tau: int, alpha: float, *, exchange_dtype: str = "float32",
                 topk_fraction: float = 0.02, error_feedback: bool = True, transfer: str = "auto",
                 chunk_bytes: int | None = None, timeout: float | None = 300.0, on_timeout: str = "warn"):
        check_tau_alpha(tau, alpha)
        self._exchange_format(exchange_dtype, topk_fraction, error_feedback)
        self.chunk_bytes = chunk_size(chunk_bytes)
        self.comm = comm
        self.tau = tau
        self.alpha = float(alpha)
        self.calls = 0  # local steps since the last synchronize_parameters / synchronize_center
        self.rounds = 0
        self.center: torch.Tensor | None = None
        self._cache = FlatCache(transfer=transfer)
        self._guard = CollectiveGuard(comm, "AllReduceEA", timeout, on_timeout)

    @classmethod
    def from_config(cls, comm: MPI.Comm, cfg, **options) -> AllReduceEA:
        """As the command line builds it from a :class:`~mpi_easgd.config.Config`."""
        return cls(comm, cfg.tau, cfg.alpha, exchange_dtype=cfg.exchange_dtype, topk_fraction=cfg.topk_fraction,
                   **options)

    def synchronize_parameters(self, model: nn.Module) -> None:
        """Broadcast rank 0's parameters (frozen ones included) and buffers; every rank's
        center becomes those parameters."""
        with self._guard("synchronize_parameters"):
            flat = self._cache.get(model)
            flat.check_views()
            bcast_module_state(self.comm, model, self._cache.data, root=0)
        self.center = flat_like(flat.data).copy_(flat.data)
        # d_i and, in a flag of the same round, whether this rank still steps
        self._round = self._round_buffer(flat.numel, flat.device)
        self.calls = self.steps = 0

    def _rounds_of(self) -> list:
        return [self._round]

    def _agree(self, flat: FlatParameters) -> None:
        bcast_tensor(self.comm, self.center, root=0, transfer=self._cache.transfer)

    def _launch(self, flat: FlatParameters, stepping: bool):
        """Move by ``d_i`` and start summing it (with whether this rank still steps)."""
        ea_local_move(flat.data, self.center, self.alpha, self._round.entries)
        self._round.start((1.0 if stepping else 0.0,))
        return self._round

    def _land(self, flat: FlatParameters) -> int:
        """The center takes the sum; returns 1 if some rank was still stepping, else 0."""
        total, (still,) = self._round.finish()
        self.center.add_(total)
        self.rounds += 1
        return int(still > 0)  # > 0: a 16-bit sum of many ones may be inexact

    def state_dict(self) -> dict:
        self._settle()
        return {"calls": self.calls, "rounds": self.rounds, "center": self.center, **self._round.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
        self.rounds = int(state["rounds"])
        self.center.copy_(state["center"])
        self._round.load_state_dict(state)
