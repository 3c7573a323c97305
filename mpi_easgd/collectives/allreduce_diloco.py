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
Allgather and a sum in rank order (:mod:`.rounds`), so that every rank's center and
momentum stay bitwise the same.

Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512): with ``fragments`` P > 1 the
flat parameters are cut into P contiguous fragments of near-equal size, each with its own
outer optimizer (and, compressed, its own residual). A round starts every ``tau / P`` steps
(at the offsets ``p tau // P`` of each period) and takes the next fragment in turn, so each
fragment has an outer step every ``tau`` steps and a round moves ``1 / P`` of the bytes.
With ``overlap_steps`` d > 0 the round is nonblocking and lands ``d`` local steps after it
started (``d < tau // P``: at most one in flight); the fragment then becomes ``mixing *
x_f + (1 - mixing) * c_f`` (``mixing`` 0, the default, is plain DiLoCo for that fragment:
the d steps taken meanwhile on it are dropped; the paper's choice with overlap is 0.5).
Uneven endings as above, until P rounds in a row with no rank stepping (every fragment one).
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
from mpi_easgd.runtime.watchdog import CollectiveGuard
from mpi_easgd.transfer import chunk_size


def check_outer(tau: int, outer_lr: float, outer_momentum: float) -> None:
    """Reject a communication period or outer optimizer setting outside its range."""
    if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
        raise ValueError(f"tau must be an integer >= 1 (local steps between outer steps); got {tau!r}")
    if not float(outer_lr) > 0:
        raise ValueError(f"outer_lr must be > 0; got {outer_lr!r}")
    if not 0.0 <= float(outer_momentum) < 1.0:
        raise ValueError(f"outer_momentum must be in [0, 1); got {outer_momentum!r}")


class Fragment:
    """One fragment of the center: its slice, its outer optimizer on a view of the center,
    its round, and the local step count at its last round's start."""

    def __init__(self, algo: AllReduceDiLoCo, start: int, stop: int, device: torch.device) -> None:
        self.part = slice(start, stop)
        self.param = nn.Parameter(algo.center[start:stop], requires_grad=False)  # shares the center's storage
        self.param.grad = torch.zeros_like(self.param)  # the pseudo-gradient
        self.outer = torch.optim.SGD([self.param], lr=algo.outer_lr, momentum=algo.outer_momentum,
                                     nesterov=algo.outer_momentum > 0)
        self.round = algo._round_buffer(stop - start, device)
        self.launched_at = 0

    def momentum(self) -> torch.Tensor | None:
        return self.outer.state[self.param].get("momentum_buffer")


class AllReduceDiLoCo(PeriodicRounds):
    """DiLoCo over ``comm``: an outer Nesterov step on the center every ``tau`` local steps.

    ``exchange_dtype``: float32, float16, bfloat16, int8, int4 or topk on the wire (module
    docstring), ``topk_fraction`` the share of entries topk sends; ``error_feedback=False``
    drops what a compressed message left out (only to see what feedback is for).
    ``fragments``, ``overlap_steps``, ``mixing``: streaming DiLoCo (module docstring).
    ``chunk_bytes``: the reduction's piece size (:func:`mpi_easgd.transfer.chunk_size`).
    ``transfer``, ``timeout`` and ``on_timeout`` as for
    :class:`~mpi_easgd.collectives.allreduce_sgd.AllReduceSGD`.
    """

    def __init__(self, comm: MPI.Comm, tau: int, outer_lr: float = 0.7, outer_momentum: float = 0.9, *,
                 exchange_dtype: str = "float32", topk_fraction: float = 0.02, error_feedback: bool = True,
                 fragments: int = 1, overlap_steps: int = 0, mixing: float = 0.0, transfer: str = "auto",
                 chunk_bytes: int | None = None, timeout: float | None = 300.0, on_timeout: str = "warn"):
        check_outer(tau, outer_lr, outer_momentum)
        check_streaming(tau, fragments, overlap_steps, mixing)
        self._exchange_format(exchange_dtype, topk_fraction, error_feedback)
        self.chunk_bytes = chunk_size(chunk_bytes)
        self.comm = comm
        self.tau = tau
        self.outer_lr, self.outer_momentum = float(outer_lr), float(outer_momentum)
        self.fragments, self.overlap_steps, self.mixing = fragments, overlap_steps, float(mixing)
        self.rounds = 0  # outer steps taken (of any fragment)
        self.center: torch.Tensor | None = None
        self._cache = FlatCache(transfer=transfer)
        self._guard = CollectiveGuard(comm, "AllReduceDiLoCo", timeout, on_timeout)

    @classmethod
    def from_config(cls, comm: MPI.Comm, cfg, **options) -> AllReduceDiLoCo:
        """As the command line builds it from a :class:`~mpi_easgd.config.Config`."""
        return cls(comm, cfg.tau, cfg.outer_lr, cfg.outer_momentum, exchange_dtype=cfg.exchange_dtype,
                   topk_fraction=cfg.topk_fraction, fragments=cfg.fragments, overlap_steps=cfg.overlap_steps,
                   mixing=cfg.mixing, **options)

    def synchronize_parameters(self, model: nn.Module) -> None:
        """Broadcast rank 0's parameters (frozen ones included) and buffers; every rank's
        center becomes those parameters and the outer momentum starts at zero."""
        with self._guard("synchronize_parameters"):
            flat = self._cache.get(model)
            flat.check_views()
            bcast_module_state(self.comm, model, self._cache.data, root=0)
        self.center = flat_like(flat.data).copy_(flat.data)
        n, p = flat.numel, self.fragments
        bounds = [k * n // p for k in range(p + 1)]
        self._parts = [Fragment(self, bounds[k], bounds[k + 1], flat.device) for k in range(p)]
        self._next = 1 % p  # the first round starts at the offset tau // P: fragment 1 (P = 1: fragment 0)
        self.calls = self.steps = 0
        self._due = self._flight = None

    def _rounds_of(self) -> list:
        return [f.round for f in self._parts]

    def _agree(self, flat: FlatParameters) -> None:
        """The center and the outer momentum as on rank 0; every ``x_i`` the center."""
        bcast_tensor(self.comm, self.center, root=0, transfer=self._cache.transfer)
        for f in self._parts:
            if f.momentum() is not None:
                bcast_tensor(self.comm, f.momentum(), root=0, transfer=self._cache.transfer)
        flat.data.copy_(self.center)

    def _launch(self, flat: FlatParameters, stepping: bool):
        """Start the next fragment's round: its ``c - x_i``, whether this rank still steps,
        and whether it stepped since that fragment's last round."""
        f = self._parts[self._next]
        self._next = (self._next + 1) % self.fragments
        self._landing = f
        torch.sub(self.center[f.part], flat.data[f.part], out=f.round.entries)
        f.round.start((1.0 if stepping else 0.0, 1.0 if self.steps > f.launched_at else 0.0))
        f.launched_at = self.steps
        return f.round

    def _land(self, flat: FlatParameters) -> int:
        """The outer step on the fragment (if any rank stepped since its last round), the
        fragment mixed toward the new center; returns 1 if some rank still steps, else 0."""
        f = self._landing
        total, flags = f.round.finish()
        # > 0, not the count: a 16-bit sum of many ones may be inexact
        if flags[1] > 0:
            # delta = sum / p, then the outer step; x_i restarts from (or mixes toward) the new center.
            torch.mul(total, 1.0 / self.comm.Get_size(), out=f.param.grad)
            f.outer.step()
            x = flat.data[f.part]
            if self.mixing:
                x.mul_(self.mixing).add_(self.center[f.part], alpha=1.0 - self.mixing)
            else:
                x.copy_(self.center[f.part])
            self.rounds += 1
        return int(flags[0] > 0)

    def state_dict(self) -> dict:
        self._settle()
        return {"calls": self.calls, "steps": self.steps, "rounds": self.rounds, "next": self._next,
                "center": self.center,
                "fragments": [dict(launched_at=f.launched_at, outer=f.outer.state_dict(), **f.round.state_dict())
                              for f in self._parts]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["fragments"]) != self.fragments:
            raise ValueError(f"the state has {len(state['fragments'])} fragments, this object {self.fragments}")
        self.calls, self.steps, self.rounds = int(state["calls"]), int(state["steps"]), int(state["rounds"])
        self._next = int(state["next"])
        self.center.copy_(state["center"])
        for f, saved in zip(self._parts, state["fragments"]):
            f.launched_at = int(saved["launched_at"])
            f.outer.load_state_dict(saved["outer"])
            f.round.load_state_dict(saved)


def check_streaming(tau: int, fragments: int, overlap_steps: int, mixing: float) -> None:
    """Reject a streaming setting outside its range."""
    if isinstance(fragments, bool) or not isinstance(fragments, int) or not 1 <= fragments <= tau:
        raise ValueError(f"fragments must be an integer in [1, tau] (tau {tau}: a round every tau / fragments "
                         f"steps); got {fragments!r}")
    if isinstance(overlap_steps, bool) or not isinstance(overlap_steps, int) or not (
            0 <= overlap_steps < max(1, tau // fragments)):
        raise ValueError(f"overlap_steps must be an integer in [0, tau // fragments) = [0, {tau // fragments}) "
                         f"(at most one round in flight); got {overlap_steps!r}")
    if not 0.0 <= float(mixing) < 1.0:
        raise ValueError(f"mixing must be in [0, 1) (0: a fragment restarts from the center); got {mixing!r}")
