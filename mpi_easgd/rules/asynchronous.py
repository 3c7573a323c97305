"""What differs between EASGD, EAMSGD, DOWNPOUR and async DiLoCo: one small rule object each side.

The engine's server loop and worker loop (:mod:`mpi_easgd.ps`) are shared; they ask a
:class:`ServerRule` how to apply one exchange to the center, and a :class:`WorkerRule` what
to send and how to take in the reply. :mod:`mpi_easgd.registry` names each algorithm's
pair; :func:`server_rule` and :func:`worker_rule` build them by the algorithm's name.

- EASGD / EAMSGD (the paper's Algorithms 1 and 2; EAMSGD differs only in the worker's local
  optimizer, Nesterov momentum): the worker sends ``x``, the server replies with ``c``
  (its value *before* the pull) and both apply ``alpha (x - c)`` in opposite directions.
- DOWNPOUR: the worker sends its accumulated update ``x - x_at_last_sync``; the server adds
  it and replies with the new ``c``, which replaces ``x``.
- Async DiLoCo (Liu et al. 2024): the worker sends its pseudo-gradient ``x_at_last_sync -
  x``; the server steps the center with the delayed Nesterov outer optimizer and replies
  with the new ``c``, from which the worker starts again.
"""

from __future__ import annotations

import abc
import collections
import math
import statistics
from dataclasses import dataclass

import torch

from mpi_easgd.flat import flat_like
from mpi_easgd.registry import lookup
from mpi_easgd.rules.elastic import (
    delayed_nesterov_update,
    downpour_server_update,
    easgd_server_update,
    easgd_worker_update,
    restart_from_center,
)


@dataclass(frozen=True)
class Arrival:
    """What the server knows of an exchange when it applies it."""

    worker: int  # the worker's index (0 .. workers - 1)
    staleness: int  # center updates by other workers since this worker's previous exchange (0 at its first)
    version: int  # the center's version: updates applied before this one
    time: float = 0.0  # seconds since the server started serving (the audit keeps it)


class WorkerRule:
    """The worker side of one algorithm, on the flat parameters ``x``.

    :meth:`prepare` fills :attr:`send` from :attr:`sent`, the parameters the message is made
    of; :meth:`absorb` takes in :attr:`reply`. Blocking exchange: ``sent`` is ``x`` itself.
    Overlapped exchange (``overlap=True``): ``sent`` is a snapshot of ``x`` taken by
    :meth:`prepare`, so the training loop may go on stepping ``x`` while the message and
    the reply are in flight; :meth:`absorb` then applies the move computed from ``sent``
    and keeps the steps taken meanwhile.

    ``message`` says what :attr:`send` is, for a compressed exchange
    (:mod:`mpi_easgd.ps.wire`): ``"state"`` (parameters: sent against a reference both ends
    hold) or ``"delta"`` (an increment: sent with the worker's residual)."""

    message = "state"

    def __init__(self, x: torch.Tensor, overlap: bool = False) -> None:
        self.x = x
        self.sent = flat_like(x) if overlap else x
        self.reply = flat_like(x)

    @classmethod
    def build(cls, x: torch.Tensor, alpha: float, overlap: bool) -> WorkerRule:
        """The rule on ``x`` (``alpha``: the elastic coefficient, where the rule has one)."""
        return cls(x, overlap)

    def prepare(self) -> None:
        if self.sent is not self.x:
            self.sent.copy_(self.x)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ElasticWorker(WorkerRule):
    """EASGD/EAMSGD worker side: send ``x``; on reply ``c``: ``x -= alpha (sent - c)``
    (``sent`` is ``x`` for a blocking exchange)."""

    def __init__(self, x: torch.Tensor, alpha: float, overlap: bool = False) -> None:
        super().__init__(x, overlap)
        self.alpha = alpha
        self.send = self.sent  # the parameters themselves (or their snapshot): no copy

    @classmethod
    def build(cls, x: torch.Tensor, alpha: float, overlap: bool) -> WorkerRule:
        return cls(x, alpha, overlap)

    def absorb(self) -> None:
        easgd_worker_update(self.x, self.reply, self.alpha, self.sent)


class DownpourWorker(WorkerRule):
    """DOWNPOUR worker side: send ``sent - anchor``; on reply ``c``: ``x = c + (x - sent)``
    (``x = c`` for a blocking exchange), ``anchor = c``."""

    message = "delta"

    def __init__(self, x: torch.Tensor, overlap: bool = False) -> None:
        super().__init__(x, overlap)
        self.anchor = flat_like(x).copy_(x)
        self.send = flat_like(x)

    def prepare(self) -> None:
        """Fill ``self.send`` with the update accumulated since the last exchange."""
        super().prepare()
        torch.sub(self.sent, self.anchor, out=self.send)

    def state_dict(self) -> dict:
        return {"anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        self.anchor.copy_(state["anchor"])

    def absorb(self) -> None:
        restart_from_center(self.x, self.reply, self.sent)
        self.anchor.copy_(self.reply)


class OuterWorker(DownpourWorker):
    """Async DiLoCo worker side: send the pseudo-gradient ``anchor - sent``; on reply ``c``:
    ``x = c + (x - sent)`` (``x = c`` for a blocking exchange), ``anchor = c``."""

    def prepare(self) -> None:
        WorkerRule.prepare(self)
        torch.sub(self.anchor, self.sent, out=self.send)


class ServerRule(abc.ABC):
    """The server's side of one asynchronous algorithm, and the interface of a new one.

    A rule is a pair: this class, whose :meth:`apply` turns one worker's message into the
    new center and the reply, and the worker's side, :attr:`worker_rule` (a
    :class:`WorkerRule` subclass: what a worker sends, and how it takes the reply in). To
    write a new algorithm, subclass both (or reuse a worker side) and name the server
    class on the command line, ``--algo package.module:MyRule``, or pass it to the API.
    The engine does the rest unchanged: checkpoints (:meth:`state_dict`), overlapped and
    compressed exchanges, the audit (which rebuilds the rule from :meth:`params` and replays
    every :class:`Arrival` through :meth:`exchange`), ``--max-staleness`` (:meth:`exchange`
    damps what :meth:`apply` does), worker loss and replacement.

    Class attributes a rule sets:

    - ``worker_rule``: its worker side;
    - ``settings``: the configuration fields it reads (any of ``alpha``, ``outer_lr``,
      ``outer_momentum``, ``outer_delay``, ``outer_quorum``); they are passed to the
      constructor and recorded in the run's summary;
    - ``nesterov``: whether the workers' local optimizer uses Nesterov momentum.
    """

    worker_rule: type[WorkerRule]
    settings: tuple[str, ...] = ()
    nesterov = False

    def __init__(self, algo: str, alpha: float = 0.0, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 outer_delay: int = 1, max_staleness: int = 0, outer_quorum: float = 0.0) -> None:
        self.algo = algo  # the registry's name (the audit rebuilds the rule from it)
        self.alpha = alpha
        self.outer_lr, self.outer_momentum, self.outer_delay = outer_lr, outer_momentum, outer_delay
        self.max_staleness = max_staleness
        self.outer_quorum = outer_quorum

    def params(self) -> dict:
        """The constructor's arguments (an audit log keeps them to replay the run)."""
        return dict(algo=self.algo, alpha=self.alpha, outer_lr=self.outer_lr, outer_momentum=self.outer_momentum,
                    outer_delay=self.outer_delay, max_staleness=self.max_staleness, outer_quorum=self.outer_quorum)

    def damps(self, arrival: Arrival | None) -> float:
        """The factor ``--max-staleness K`` puts on this exchange: ``K / staleness`` when
        its staleness exceeds K, else 1 (and always 1 without K)."""
        stale = arrival.staleness if arrival is not None else 0
        return self.max_staleness / stale if self.max_staleness and stale > self.max_staleness else 1.0

    def exchange(self, center: torch.Tensor, incoming: torch.Tensor,
                 arrival: Arrival | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`apply`, damped by :meth:`damps`: an exchange staler than ``K`` moves the
        center by ``K / staleness`` of what it would have. A message that is an increment
        (DOWNPOUR's update, a pseudo-gradient) is scaled before the rule takes it (an outer
        optimizer's momentum sees the damped one); for a state (EASGD's parameters) the
        center's move is scaled. The engine and the audit's replay both call this."""
        factor = self.damps(arrival)
        if factor == 1.0:
            return self.apply(center, incoming, arrival)
        if message_kind(self.worker_rule) == "delta":
            return self.apply(center, incoming.mul_(factor), arrival)
        new, reply = self.apply(center, incoming, arrival)
        return torch.lerp(center, new, factor, out=new), reply

    @abc.abstractmethod
    def apply(self, center: torch.Tensor, incoming: torch.Tensor,
              arrival: Arrival | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(new center, reply)`` for a worker's message ``incoming`` (float32, the rule's
        to overwrite: the built-in rules write the new center over it, so that nothing is
        allocated). ``center`` must never be written: it may still be on its way to another
        worker. ``arrival``: who sent it and how stale it is (always given by the engine)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 - a rule without state of its own keeps this
        """Take back what :meth:`state_dict` gave (a resumed run, the audit's replay)."""


class ElasticServer(ServerRule):
    """EASGD / EAMSGD: ``c += alpha (x - c)``; the reply is the center before the pull."""

    worker_rule = ElasticWorker
    settings = ("alpha",)

    def apply(self, center: torch.Tensor, incoming: torch.Tensor,
              arrival: Arrival | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return easgd_server_update(center, incoming, self.alpha), center


class DownpourServer(ServerRule):
    """DOWNPOUR: ``c += delta``; the reply is the new center."""

    worker_rule = DownpourWorker

    def apply(self, center: torch.Tensor, incoming: torch.Tensor,
              arrival: Arrival | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        new = downpour_server_update(center, incoming)
        return new, new


class OuterServer(ServerRule):
    """Async DiLoCo: the pseudo-gradient through the delayed Nesterov outer optimizer; the
    reply is the new center. Its state (momentum, the pseudo-gradients pending since the
    last momentum step, the push count) is the rule's own.

    When the momentum steps: every ``outer_delay`` pushes, whoever sent them; or with
    ``outer_quorum`` q > 0, once ``ceil(q * outer_delay)`` *distinct* workers have pushed
    since the last step (a fast worker's second push does not count twice), or once a
    grace window has passed since the round's first push: the median interval between a
    worker's pushes plus twice their spread (median absolute deviation), as measured over
    the run's last :data:`INTERVALS` intervals, so that no timeout is guessed. The window
    is looked at when a push arrives. The momentum then takes the mean of the round's
    pushes, however many there were."""

    worker_rule = OuterWorker
    settings = ("outer_lr", "outer_momentum", "outer_delay", "outer_quorum")
    INTERVALS = 64

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pushes = 0
        self.momentum: torch.Tensor | None = None  # allocated at the first push
        self.pending: torch.Tensor | None = None
        # (quorum) this round's workers and pushes, when it began; intervals between a worker's pushes
        self.round: set[int] = set()
        self.round_pushes = 0
        self.round_began: float | None = None
        self.last_push: dict[int, float] = {}
        self.intervals: collections.deque[float] = collections.deque(maxlen=self.INTERVALS)
        self.steps = {"quorum": 0, "grace": 0}  # momentum steps by what ended the round

    def apply(self, center: torch.Tensor, incoming: torch.Tensor,
              arrival: Arrival | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.momentum is None:
            self.momentum, self.pending = torch.zeros_like(center), torch.zeros_like(center)
        self.pushes += 1
        if self.outer_quorum:
            milestone = self._round_ends(arrival or Arrival(0, 0, self.pushes))
            mean_of = self.round_pushes
            if milestone:
                self.round, self.round_pushes, self.round_began = set(), 0, None
        else:
            milestone, mean_of = self.pushes % self.outer_delay == 0, self.outer_delay
        new = delayed_nesterov_update(center, incoming, self.momentum, self.pending, milestone, self.outer_lr,
                                      self.outer_momentum, self.outer_delay, mean_of)
        return new, new

    def _round_ends(self, arrival: Arrival) -> bool:
        """Count ``arrival`` in the round; whether the round ends with it (and why, in :attr:`steps`)."""
        now, worker = arrival.time, arrival.worker
        if worker in self.last_push:
            self.intervals.append(now - self.last_push[worker])
        self.last_push[worker] = now
        self.round.add(worker)
        self.round_pushes += 1
        if self.round_began is None:
            self.round_began = now
        if len(self.round) >= math.ceil(self.outer_quorum * self.outer_delay):
            self.steps["quorum"] += 1
            return True
        if len(self.intervals) >= 3:
            median = statistics.median(self.intervals)
            spread = statistics.median(abs(i - median) for i in self.intervals)
            if now - self.round_began > median + 2 * spread:
                self.steps["grace"] += 1
                return True
        return False

    def state_dict(self) -> dict:
        state = {"pushes": self.pushes, "round": sorted(self.round), "round_pushes": self.round_pushes,
                 "intervals": list(self.intervals), "quorum_steps": self.steps["quorum"],
                 "grace_steps": self.steps["grace"]}
        if self.momentum is not None:
            state.update(momentum=self.momentum.clone(), pending=self.pending.clone())
        return state

    def load_state_dict(self, state: dict) -> None:
        """(A resumed round starts its clock afresh: times are the serving segment's own.)"""
        self.pushes = int(state.get("pushes", 0))
        self.round = {int(w) for w in state.get("round", [])}
        self.round_pushes = int(state.get("round_pushes", 0))
        self.intervals = collections.deque((float(i) for i in state.get("intervals", [])), maxlen=self.INTERVALS)
        self.steps = {"quorum": int(state.get("quorum_steps", 0)), "grace": int(state.get("grace_steps", 0))}
        if "momentum" in state:
            self.momentum, self.pending = state["momentum"].clone(), state["pending"].clone()


def message_kind(worker: type) -> str:
    """What a worker side's message is, for a compressed exchange: ``"state"`` or
    ``"delta"`` (:attr:`WorkerRule.message`; a worker side of a user's own that does not
    say is taken for a state, which is always safe)."""
    return getattr(worker, "message", "state")


def server_rule(algo: str, alpha: float = 0.0, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                outer_delay: int = 1, max_staleness: int = 0, outer_quorum: float = 0.0) -> ServerRule:
    """The server side of ``algo`` (looked up in :mod:`mpi_easgd.registry`); with
    ``max_staleness`` K > 0, exchanges staler than K are damped (:meth:`ServerRule.exchange`);
    ``outer_quorum``: see :class:`OuterServer`."""
    rule = lookup(algo).load()(algo, alpha, outer_lr, outer_momentum, outer_delay)
    # (set here: a user's rule need not take them in its constructor)
    rule.max_staleness, rule.outer_quorum = max_staleness, outer_quorum
    return rule


def worker_rule(algo: str, x: torch.Tensor, alpha: float = 0.0, overlap: bool = False) -> WorkerRule:
    """The worker side of ``algo`` (looked up in :mod:`mpi_easgd.registry`) on parameters
    ``x`` (``overlap``: see :class:`WorkerRule`)."""
    return lookup(algo).load().worker_rule.build(x, alpha, overlap)
