"""AllReduceDiLoCo: DiLoCo (Douillard et al. 2023), elastic averaging's modern descendant.

Every rank keeps an identical copy of the center ``c``. Every ``tau``-th call of
:meth:`AllReduceDiLoCo.average_parameters` (after the local, *inner* optimizer step)::

    delta = Allreduce_SUM(c - x_i) / p       # the pseudo-gradient c - mean(x): one reduction
    c     = one step of SGD(lr=outer_lr, momentum=outer_momentum, nesterov=True) with grad delta
    x_i   = c                                # every rank restarts from the new center

Uneven endings follow the seed's contract, as for :class:`~.allreduce_ea.AllReduceEA`:
:meth:`AllReduceDiLoCo.synchronize_center`, called by every rank after its epoch, joins
the rounds of the ranks still stepping (a rank that has arrived contributes its own ``x_i``)
until a round in which no rank is still stepping; a flag in an extra slot of the same
Allreduce says which. A round is an outer step whenever some rank made local steps since
the previous one (a second extra slot counts them), so the steps after the last full
period are not lost, and a round that brings nothing moves nothing (momentum alone would).
Then rank 0's center and outer momentum are broadcast (bitwise equal everywhere) and every
``x_i`` set to the center.

Each rank sends its own pseudo-gradient ``c - x_i`` (small, unlike ``x_i``), so that
``exchange_dtype="float16"`` or ``"bfloat16"`` halves the bytes at a rounding error relative to
the pseudo-gradient, not to the parameters; the center and momentum stay float32.
``"int8"``, ``"int4"`` or ``"topk"`` (:mod:`mpi_easgd.compress`) send the pseudo-gradient plus
what this rank's earlier messages left out (error feedback); the round is then an
Allgather and a sum in rank order (:mod:`.compressed`), so that every rank's center and
momentum stay bitwise the same.
"""

from __future__ import annotations

import torch
from mpi4py import MPI
from torch import nn

from mpi_easgd.collectives.base import (
    CollectiveGuard,
    FlatCache,
    PeriodicRounds,
    bcast_module_state,
    bcast_tensor,
)
from mpi_easgd.flat import FlatParameters, flat_like
from mpi_easgd.transfer import allreduce, chunk_size


def check_outer(tau: int, outer_lr: float, outer_momentum: float) -> None:
    """Reject a communication period or outer optimizer setting outside its range."""
    if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
        raise ValueError(f"tau must be an integer >= 1 (local steps between outer steps); got {tau!r}")
    if not float(outer_lr) > 0:
        raise ValueError(f"outer_lr must be > 0; got {outer_lr!r}")
    if not 0.0 <= float(outer_momentum) < 1.0:
        raise ValueError(f"outer_momentum must be in [0, 1); got {outer_momentum!r}")


class AllReduceDiLoCo(PeriodicRounds):
    """DiLoCo over ``comm``: an outer Nesterov step on the center every ``tau`` local steps.

    ``exchange_dtype``: float32, float16, bfloat16, int8, int4 or topk on the wire (module
    docstring), ``topk_fraction`` the share of entries topk sends; ``error_feedback=False``
    drops what a compressed message left out (only to see what feedback is for).
    ``chunk_bytes``: the reduction's piece size (:func:`mpi_easgd.transfer.chunk_size`).
    ``transfer``, ``timeout`` and ``on_timeout`` as for
    :class:`~mpi_easgd.collectives.allreduce_sgd.AllReduceSGD`.
    """

    def __init__(self, comm: MPI.Comm, tau: int, outer_lr: float = 0.7, outer_momentum: float = 0.9, *,
                 exchange_dtype: str = "float32", topk_fraction: float = 0.02, error_feedback: bool = True,
                 transfer: str = "auto", chunk_bytes: int | None = None, timeout: float | None = 300.0,
                 on_timeout: str = "warn"):
        check_outer(tau, outer_lr, outer_momentum)
        self._exchange_format(exchange_dtype, topk_fraction, error_feedback)
        self.chunk_bytes = chunk_size(chunk_bytes)
        self.comm = comm
        self.tau = tau
        self.outer_lr, self.outer_momentum = float(outer_lr), float(outer_momentum)
        self.rounds = 0  # outer steps taken
        self.center: torch.Tensor | None = None
        self._cache = FlatCache(transfer=transfer)
        self._guard = CollectiveGuard(comm, "AllReduceDiLoCo", timeout, on_timeout)

    @classmethod
    def from_config(cls, comm: MPI.Comm, cfg, **options) -> AllReduceDiLoCo:
        """As the command line builds it from a :class:`~mpi_easgd.config.Config`."""
        return cls(comm, cfg.tau, cfg.outer_lr, cfg.outer_momentum, exchange_dtype=cfg.exchange_dtype,
                   topk_fraction=cfg.topk_fraction, **options)

    def synchronize_parameters(self, model: nn.Module) -> None:
        """Broadcast rank 0's parameters (frozen ones included) and buffers; every rank's
        center becomes those parameters and the outer momentum starts at zero."""
        with self._guard("synchronize_parameters"):
            flat = self._cache.get(model)
            flat.check_views()
            bcast_module_state(self.comm, model, self._cache.data, root=0)
        self.center = flat_like(flat.data).copy_(flat.data)
        self._outer_param = nn.Parameter(self.center, requires_grad=False)  # shares the center's storage
        self._outer_param.grad = flat_like(flat.data)  # the pseudo-gradient
        self._outer = torch.optim.SGD([self._outer_param], lr=self.outer_lr, momentum=self.outer_momentum,
                                      nesterov=self.outer_momentum > 0)
        # sum of c - x_i and, in two extra slots of the same Allreduce, how many ranks still step
        # and how many made local steps since the last round
        self._round_buffers(flat, flags=2)
        self.calls = self._since = 0

    def _agree(self, flat: FlatParameters) -> None:
        """The center and the outer momentum as on rank 0; every ``x_i`` the center."""
        bcast_tensor(self.comm, self.center, root=0, transfer=self._cache.transfer)
        momentum = self._outer.state[self._outer_param].get("momentum_buffer")
        if momentum is not None:
            bcast_tensor(self.comm, momentum, root=0, transfer=self._cache.transfer)
        flat.data.copy_(self.center)

    def _round(self, flat: FlatParameters, stepping: bool) -> int:
        """One outer round; returns 1 if some rank is still stepping, else 0."""
        n = flat.numel
        buf = self._round_mpi
        total = self._round_buffer[:n]
        torch.sub(self.center, flat.data, out=total)
        flags = (1.0 if stepping else 0.0, 1.0 if self._since else 0.0)
        if self._gather is not None:
            total, flags = self._gather(total, flags)
        else:
            self._round_buffer[n:] = torch.tensor(flags)
            buf.before_send()
            allreduce(self.comm, buf, self.chunk_bytes)
            buf.after_recv()
            flags = self._round_buffer[n:].tolist()
        # > 0, not the count: a 16-bit sum of many ones may be inexact
        stepping_ranks, fresh_ranks = int(flags[0] > 0), bool(flags[1] > 0)
        if fresh_ranks:
            # delta = sum / p, then the outer step; x_i restarts from the new center.
            torch.mul(total, 1.0 / self.comm.Get_size(), out=self._outer_param.grad)
            self._outer.step()
            flat.data.copy_(self.center)
            self.rounds += 1
        self._since = 0
        return stepping_ranks

    def state_dict(self) -> dict:
        state = {"calls": self.calls, "rounds": self.rounds, "since": self._since, "center": self.center,
                 "outer": self._outer.state_dict()}
        return {**state, **self._gather.state_dict()} if self._gather else state

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
        self._since = int(state["since"])
        self.rounds = int(state["rounds"])
        self.center.copy_(state["center"])
        self._outer.load_state_dict(state["outer"])
        if self._gather is not None:
            self._gather.load_state_dict(state)
