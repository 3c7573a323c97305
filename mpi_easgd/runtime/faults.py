"""Fault injection for testing failure paths under a real launcher.

Set ``MPI_EASGD_FAULT`` to ``rank=R,action=A[,step=S][,seconds=X][,after=T][,gen=G]``
(several separated by ``;``; a rank's specs all apply) where ``A`` is
``raise`` (raise at step S), ``sleep`` (sleep X seconds before every step from S on),
``kill`` (SIGKILL itself at step S), ``stop`` (SIGSTOP itself at step S: a hung rank) or
``nan`` (feed the step at S a batch of NaN images). Only the named rank is affected.
``at=M`` moves the action to another moment of a synchronous peer's run (:data:`MOMENTS`):
``save``, the checkpoint of step S, once this rank's file is written and before the
checkpoint is complete; ``sync`` and ``eval``, the end of epoch S (counted from 1): before
its ``synchronize_parameters``/``synchronize_center``, or after it, before the evaluation;
``end``, the end of the run, after the final checkpoint and before the summary's
collectives; ``shrink``, while another rank's death is handled (``--on-rank-loss
shrink``: once the communicator is shrunk, before the survivors agree); ``final``, an
async shard server (``--servers S``) told to send its piece of the final snapshot, before
it does. S is ignored at ``end``, ``shrink`` and ``final``.
A step is a training step on workers and peers, an evaluation on the tester, and an
applied exchange on the async server; ``step=-1`` on a synchronous peer is its start,
before the first parameter broadcast; ``after=T`` waits, past step S, for the first step
at least T seconds after the fault was read (when training starts). ``gen`` is which process standing as rank R
the fault applies to: 0 (the default) the one the launcher started, 1 its first
replacement (``--on-worker-loss respawn``), ``*`` every one. A ``kill`` says when on
stderr (``time.time()``), for the benchmarks. Unset: no cost.

One more action is no fault but an emulated network: ``delay`` (``rank=R,action=delay,
seconds=X[,mbps=B]``, beside any one action above) makes every exchange of that rank land
no sooner than ``X + bytes / bandwidth`` seconds after it started, as over a network with
that latency and B megabits per second (:func:`emulated_link`): on an async worker an
exchange's bytes are its message's and its reply's; in a synchronous round they are what
the collective moves through each rank's link (a ring Allreduce: ``2 (p - 1) / p`` of the
buffer; a gather: the other ranks' ``(p - 1)`` messages). The wait is a sleep, as a real
link's would be: it counts as time blocked in the exchange, never as compute.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch

ENV = "MPI_EASGD_FAULT"
GENERATION_ENV = "MPI_EASGD_GENERATION"  # set by a replacement worker: which one it is (1, 2, ...)
ACTIONS = ("raise", "sleep", "kill", "stop", "nan", "delay")
MOMENTS = ("step", "save", "sync", "eval", "end", "shrink", "final")  # where ``at=`` puts the action


class InjectedFault(RuntimeError):
    """Raised by ``action=raise``."""


@dataclass(frozen=True)
class Fault:
    action: str
    step: int = 0
    seconds: float = 0.0
    after: float = 0.0
    mbps: float = 0.0  # (delay) the emulated link's bandwidth; 0: unlimited
    at: str = "step"  # another moment of a sync peer's run (MOMENTS; the module docstring)
    read: float = field(default_factory=time.monotonic)  # when it was read (``after`` counts from it)

    def at_step(self, step: int) -> None:
        """Call once per local step with the step number."""
        if step < self.step or self.at != "step":
            return
        if self.action == "sleep":
            time.sleep(self.seconds)
            return
        if self.after and time.monotonic() - self.read < self.after:
            return
        if self.after or step == self.step:
            self.act(f"at step {step}")

    def act(self, where: str) -> None:
        """Raise, kill or stop now (the other actions act per step); ``where`` is said."""
        if self.action == "raise":
            raise InjectedFault(f"injected fault {where} ({ENV})")
        if self.action == "kill":
            print(f"mpi_easgd: fault: killed {where} at {time.time():.3f}", file=sys.stderr, flush=True)
        if self.action in ("kill", "stop"):
            os.kill(os.getpid(), signal.SIGKILL if self.action == "kill" else signal.SIGSTOP)

    def before_step(self, step: int, batch):
        """The training loop's hook: :meth:`at_step`, and the batch to train on (all NaN
        at ``action=nan``'s step)."""
        self.at_step(step)
        if self.action == "nan" and step == self.step and batch is not None:
            batch = (torch.full_like(batch[0], float("nan")), batch[1])
        return batch


def _specs(rank: int, environ) -> list[Fault]:
    """Every spec of ``$MPI_EASGD_FAULT`` for ``rank`` (and this process's generation,
    ``$MPI_EASGD_GENERATION``), in order."""
    found = []
    for spec in environ.get(ENV, "").split(";"):
        if not spec:
            continue
        fields = dict(item.split("=", 1) for item in spec.split(","))
        if int(fields.get("rank", -1)) != rank:
            continue
        if fields.get("gen", "0") not in ("*", environ.get(GENERATION_ENV, "0")):
            continue
        if fields.get("action") not in ACTIONS:
            raise ValueError(f"{ENV}: action must be one of {', '.join(ACTIONS)}; got {spec!r}")
        if fields.get("at", "step") not in MOMENTS:
            raise ValueError(f"{ENV}: at must be one of {', '.join(MOMENTS)}; got {spec!r}")
        found.append(Fault(fields["action"], int(fields.get("step", 0)), float(fields.get("seconds", 0)),
                           float(fields.get("after", 0)), mbps=float(fields.get("mbps", 0)),
                           at=fields.get("at", "step")))
    return found


class Faults(tuple):
    """Every fault of one rank, each applied at every step (a kill after a slow-down...)."""

    def at_start(self) -> None:
        """The faults of ``step=-1``: at a run's start, before its first parameter broadcast."""
        for fault in self:
            if fault.step == -1 and fault.action in ("raise", "kill", "stop"):
                fault.at_step(-1)

    def at_step(self, step: int) -> None:
        for fault in self:
            fault.at_step(step)

    def at(self, moment: str, number: int = 0) -> None:
        """The faults of ``at=moment`` (:data:`MOMENTS`) whose S is ``number`` (the
        checkpoint's step, the epoch; any at ``end``, ``shrink`` and ``final``)."""
        where = dict(save=f"in the checkpoint of step {number}", sync=f"in the synchronize ending epoch {number}",
                     eval=f"in the evaluation ending epoch {number}", end="at the end of the run",
                     shrink="while another death was handled", final="before its piece of the final snapshot")[moment]
        for fault in self:
            if fault.at == moment and (moment in ("end", "shrink", "final") or number == fault.step):
                fault.act(where)

    def before_step(self, step: int, batch):
        for fault in self:
            batch = fault.before_step(step, batch)
        return batch


def from_env(rank: int, environ=os.environ) -> Faults | None:
    """The faults for ``rank`` from ``$MPI_EASGD_FAULT`` (its specs other than ``delay``),
    or None."""
    return Faults(f for f in _specs(rank, environ) if f.action != "delay") or None


@dataclass(frozen=True)
class Link:
    """An emulated network link: an exchange of ``nbytes`` takes at least :meth:`seconds`."""

    latency: float  # seconds per exchange
    mbps: float = 0.0  # megabits per second; 0: unlimited

    def seconds(self, nbytes: int) -> float:
        return self.latency + (nbytes * 8 / (self.mbps * 1e6) if self.mbps > 0 else 0.0)

    def wait(self, started: float, nbytes: int) -> None:
        """Sleep until an exchange of ``nbytes`` started at ``started`` (``time.perf_counter``)
        could have landed."""
        time.sleep(max(0.0, started + self.seconds(nbytes) - time.perf_counter()))


def emulated_link(rank: int, environ=os.environ) -> Link | None:
    """``rank``'s ``action=delay`` spec as a :class:`Link`, None if it has none."""
    return next((Link(f.seconds, f.mbps) for f in _specs(rank, environ) if f.action == "delay"), None)
