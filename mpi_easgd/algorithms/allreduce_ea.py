"""AllReduceEA: synchronous elastic averaging (synchronous EASGD, beta = p * alpha).

Every rank keeps an identical copy of the center ``c``. Every ``tau``-th call of
:meth:`AllReduceEA.average_parameters` (after the local optimizer step)::

    d_i = alpha * (x_i - c);  x_i -= d_i;  D = Allreduce_SUM(d_i);  c += D

A rank that has run out of data keeps calling ``average_parameters`` (without stepping)
until every rank is out, so the Allreduces stay matched.
"""

from __future__ import annotations

import torch
from mpi4py import MPI
from torch import nn

from mpi_easgd.algorithms._common import FlatCache, bcast_module_state, bcast_tensor
from mpi_easgd.algorithms.elastic import ea_local_move
from mpi_easgd.flat import FlatParameters, MPIBuffer, flat_like


def check_tau_alpha(tau: int, alpha: float) -> None:
    """Reject a communication period or elastic coefficient outside its range."""
    if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
        raise ValueError(f"tau must be an integer >= 1 (local steps between exchanges); got {tau!r}")
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be in (0, 1) (the elastic coefficient); got {alpha!r}")


class AllReduceEA:
    """Synchronous elastic averaging over ``comm`` every ``tau`` steps with coefficient ``alpha``."""

    def __init__(self, comm: MPI.Comm, tau: int, alpha: float, *, transfer: str = "auto"):
        check_tau_alpha(tau, alpha)
        self.comm = comm
        self.tau = tau
        self.alpha = float(alpha)
        self.calls = 0
        self.rounds = 0
        self.center: torch.Tensor | None = None
        self._cache = FlatCache(transfer=transfer)

    def synchronize_parameters(self, model: nn.Module) -> None:
        """Broadcast rank 0's parameters; every rank's center becomes those parameters."""
        flat = self._cache.get(model)
        flat.check_views()
        bcast_module_state(self.comm, model, self._cache.data, root=0)
        self.center = flat_like(flat.data).copy_(flat.data)
        self._diff = flat_like(flat.data)
        self._diff_buf = MPIBuffer(self._diff, self._cache.transfer)
        self.calls = 0

    def average_parameters(self, model: nn.Module) -> bool:
        """Count one local step; every ``tau``-th call run one elastic round.

        Returns True when a round ran.
        """
        if self.center is None:
            raise RuntimeError("call synchronize_parameters(model) before average_parameters")
        self.calls += 1
        if self.calls % self.tau:
            return False
        flat = self._cache.get(model)
        ea_local_move(flat.data, self.center, self.alpha, self._diff)
        self._diff_buf.before_send()
        self.comm.Allreduce(MPI.IN_PLACE, self._diff_buf.mpi, op=MPI.SUM)
        self._diff_buf.after_recv()
        self.center.add_(self._diff)
        self.rounds += 1
        return True

    def synchronize_center(self, model: nn.Module) -> None:
        """Make every copy of the center bitwise equal to rank 0's (floating-point drift)."""
        if self.center is None:
            raise RuntimeError("call synchronize_parameters(model) before synchronize_center")
        bcast_tensor(self.comm, self.center, root=0, transfer=self._cache.transfer)

    def flat(self, model: nn.Module) -> FlatParameters:
        """The flat parameter/gradient buffers of ``model`` (built on first use)."""
        return self._cache.get(model)

    def state_dict(self) -> dict:
        return {"calls": self.calls, "rounds": self.rounds, "center": self.center}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
        self.rounds = int(state["rounds"])
        self.center.copy_(state["center"])
