"""The server's side of the tester: snapshots of the center that never hold training up.

Every ``test_every`` seconds the server offers the tester the current center with a
nonblocking send straight from the (immutable) center buffer, skipping a snapshot while
the previous one is still in flight. Only the final center waits for the tester, and
only up to a deadline.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from mpi_easgd.ps.center import CenterVersions
from mpi_easgd.ps.protocol import Kind, Tag, meta_message, sleep_until
from mpi_easgd.ps.roster import Roster
from mpi_easgd.ps.spares import let_go
from mpi_easgd.runtime import ft


class TesterFeed:
    """Snapshots of ``center`` for rank ``tester`` of ``comm``, each with the center's
    version and the samples trained on before it (``samples_per_exchange`` a worker
    exchange brings, counted from the roster). ``on_send(kind)``: called as each one goes;
    ``taken_over()``: which shards rank 0 serves now in place of their dead server rank
    (a bitmask the tester reads from the snapshot's meta message: where each shard comes from)."""

    def __init__(self, comm: MPI.Comm, center: CenterVersions, tester: int, test_every: float,
                 samples_per_exchange: int, on_send=None, taken_over=None) -> None:
        self.comm, self.center, self.tester, self.test_every = comm, center, tester, test_every
        self.on_send = on_send  # called with each snapshot's Kind as it goes (the other shards send theirs)
        self.taken_over = taken_over or (lambda: 0)
        self.samples_per_exchange = samples_per_exchange
        self.snapshots = 0  # sent (the tester evaluates every one: its checkpoint state)
        self.final = False
        self.lost = False  # (ULFM) the tester died: the run goes on without evaluations
        self.live: MPI.Comm | None = None  # a replacement tester's liveness channel (None: the server's own)
        self.replaced: list[tuple[MPI.Comm, MPI.Comm]] = []  # (respawn) each replacement's intercommunicators
        self._requests: list[MPI.Request] = []
        self._meta = np.zeros(0, dtype=np.int64)
        self._watched = np.zeros(1, dtype=np.int64)
        self._last = -float("inf")  # the first update is sent at once: the curve's start

    def offer(self, updates: int, roster: Roster) -> None:
        """Send the current center if a snapshot is due and the tester has taken the last."""
        if self.final or self.lost or time.perf_counter() - self._last < self.test_every:
            return  # (after the final center, the tester takes nothing more)
        if self._requests and not self._taken():
            return  # the tester is still busy with the previous one: skip, never wait
        self._send(Kind.SNAPSHOT, updates, roster.samples(self.samples_per_exchange))

    def _taken(self) -> bool:
        """Whether the last snapshot has gone; (ULFM) a dead tester's is gone for good."""
        with ft.survivable() as death:
            done = MPI.Request.Testall(self._requests)
        self.lost |= bool(death) or self._dead()
        return done or self.lost

    def watch(self) -> MPI.Request:
        """(ULFM) A receive from the tester that nothing ever matches: it completes, in
        error, the moment the tester dies (the server waits on it among its receives)."""
        return self.comm.Irecv(self._watched, source=self.tester, tag=Tag.WATCH)

    def notice(self) -> None:
        """(ULFM) After a receive failed somewhere: whether it was the tester that died."""
        self.lost |= self._dead()

    def replace(self, comm: MPI.Comm, live: MPI.Comm) -> None:
        """The tester that died is replaced by rank 0 of ``comm`` (a spare process's
        intercommunicator; ``live``: its liveness channel): snapshots go there, the next at once."""
        self.comm, self.tester, self.live = comm, 0, live
        self.replaced.append((comm, live))
        self.lost, self._requests, self._last = False, [], -float("inf")

    def let_go(self) -> None:
        """After the run's summary: disconnect from the replacement testers (a dead one is
        only freed: there is nobody to disconnect from)."""
        if self.replaced:
            last = self.replaced[-1][0]
            let_go(self.replaced, lambda comm: comm is last and not self.lost)
        self.replaced = []

    def send_final(self, updates: int, roster: Roster, deadline: float) -> bool:
        """Hand over the final center once the previous snapshot has gone (False if it did
        not by ``deadline``: the tester is hung or lost). (ULFM) A dead tester gets
        nothing: :attr:`lost`."""
        with ft.survivable() as death:
            gone = sleep_until(lambda: self._dead() or MPI.Request.Testall(self._requests), deadline)
        self.lost |= bool(death) or self._dead()
        if self.lost:
            self.final = True
            self._requests = []  # (nothing will take them: the server does not wait for them)
            return True
        if not gone:
            return False
        self._send(Kind.FINAL, updates, roster.samples(self.samples_per_exchange))
        self.final = True
        return True

    def _dead(self) -> bool:
        """(ULFM) Whether MPI knows the tester died (a send to it may still complete)."""
        return ft.enabled() and ft.is_dead(self.comm, self.tester)

    def _send(self, kind: Kind, updates: int, samples: int) -> None:
        self._meta = meta_message(kind, updates, samples, self.taken_over())
        self._requests = [
            self.comm.Isend(self._meta, dest=self.tester, tag=Tag.SNAPSHOT_META),
            self.center.send(self.comm, self.center.current, self.tester, Tag.SNAPSHOT),  # no copy: immutable
        ]
        if self.on_send:
            self.on_send(kind)
        self.snapshots += 1
        self._last = time.perf_counter()
