"""The server's posted receives, as named groups that yield typed events.

For every worker the server keeps three receives posted (its next exchange, DONE and
SAVED), plus the liveness thread's wake-up call (and on rank 0 of a sharded center under
ULFM a watch on each shard server: a receive that completes only in error, when it dies);
:meth:`Endpoints.wait` completes whichever
arrives first with ``Waitany``, a blocking wait (no spinning on ``Test``, which would steal
the CPU from workers sharing the node), and returns it as an :class:`Event`.

Where each worker is reached is read from its record (:mod:`.roster`): a replacement
process talks to the server over the intercommunicator that started it, and
:meth:`Endpoints.repost` posts its receives there. The server's control messages to a
worker (SAVE, RESUME, END) go out here too (:meth:`Endpoints.tell`).

Under ULFM (:mod:`mpi_easgd.runtime.ft`) a receive from a worker that died completes in error:
that is a FAILED event (MPI says who died).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from mpi4py import MPI

from mpi_easgd.ps.protocol import DONE_LEN, SAVED_LEN, Tag
from mpi_easgd.ps.roster import Roster
from mpi_easgd.runtime import ft
from mpi_easgd.transfer import mpi_view


class Kind(enum.Enum):
    EXCHANGE = "exchange"  # a worker's parameters (or update) arrived: apply and reply
    DONE = "done"  # a worker finished training: its totals
    SAVED = "saved"  # a worker's checkpoint file is on disk (or failed)
    WAKE = "wake"  # the liveness thread found silent workers
    FAILED = "failed"  # (ULFM) a receive failed because its worker died


class Event(NamedTuple):
    kind: Kind
    worker: int  # index into the server's workers (-1 for WAKE and FAILED)
    data: object  # EXCHANGE: the buffer it arrived in; DONE: int64[DONE_LEN]; SAVED: epoch (-1: failed)


@dataclass
class _Posted:
    """What the server receives into for one worker: its DONE and SAVED messages and its
    next exchange (a buffer from the pool while one is posted)."""

    done: np.ndarray = field(default_factory=lambda: np.zeros(DONE_LEN, dtype=np.int64))
    saved: np.ndarray = field(default_factory=lambda: np.zeros(SAVED_LEN, dtype=np.int64))
    incoming: torch.Tensor | None = None


class Endpoints:
    """Posted receives for every worker of ``roster``, and the wake-up call (``wake()``
    posts it, on the liveness communicator; called again after each). Exchange buffers
    come from ``take()``; after an EXCHANGE event the caller owns the buffer and posts a
    fresh one with :meth:`post_exchange`. DONE is received once; SAVED and WAKE are
    re-armed here."""

    def __init__(self, roster: Roster, take, wake, watches: list[MPI.Request] = ()) -> None:
        self.roster = roster
        self._posted: list[_Posted] = []  # one per worker (a joiner's is added while the others are posted)
        self._wake = wake
        self._slots: list[tuple[Kind, int]] = [(Kind.WAKE, -1)] + [(Kind.FAILED, -1)] * len(watches)
        # (watches: receives that complete only in error, when a shard server died)
        self._requests: list[MPI.Request] = [wake(), *watches]
        self._index: dict[tuple[Kind, int], int] = {}
        self._told: list[tuple[np.ndarray, MPI.Request]] = []  # control messages in flight
        for _ in range(len(roster)):
            self.add(take())

    def watch(self, request: MPI.Request) -> None:
        """One more watch (a receive that completes only in error, when its peer died: the
        tester's, :meth:`~mpi_easgd.ps.tester_feed.TesterFeed.watch`)."""
        self._slots.append((Kind.FAILED, -1))
        self._requests.append(request)

    def add(self, buf: torch.Tensor) -> None:
        """Post the receives of the roster's next worker (at the start; then a late joiner's),
        the exchange into ``buf``."""
        i = len(self._posted)
        self._posted.append(_Posted())
        for kind in (Kind.EXCHANGE, Kind.DONE, Kind.SAVED):
            self._index[kind, i] = len(self._slots)
            self._slots.append((kind, i))
            self._requests.append(MPI.REQUEST_NULL)
        self.repost(i, buf)

    def _post(self, kind: Kind, i: int) -> None:
        comm, _, rank = self.roster[i].link
        if kind is Kind.DONE:
            request = comm.Irecv(self._posted[i].done, source=rank, tag=Tag.DONE)
        elif kind is Kind.SAVED:
            request = comm.Irecv(self._posted[i].saved, source=rank, tag=Tag.SAVED)
        else:
            request = comm.Irecv(mpi_view(self._posted[i].incoming), source=rank, tag=Tag.EXCHANGE)
        self._requests[self._index[kind, i]] = request

    def post_exchange(self, i: int, buf: torch.Tensor) -> None:
        """Receive worker ``i``'s next message into ``buf``."""
        self._posted[i].incoming = buf
        self._post(Kind.EXCHANGE, i)

    def repost(self, i: int, buf: torch.Tensor) -> None:
        """Post all of worker ``i``'s receives where its record's link says (at the start,
        and for a replacement: its old ones must have been withdrawn), the exchange into
        ``buf``."""
        self.post_exchange(i, buf)
        self._post(Kind.DONE, i)
        self._post(Kind.SAVED, i)

    def wait(self) -> Event:
        """The next message to arrive, from any worker, or the wake-up call."""
        with ft.survivable() as death:
            n = MPI.Request.Waitany(self._requests)
        if death:  # MPI has set the failed request to null
            return Event(Kind.FAILED, -1, None)
        kind, i = self._slots[n]
        if kind is Kind.FAILED:  # (a watch: nothing is ever sent to it)
            return Event(kind, -1, None)
        if kind is Kind.EXCHANGE:
            buf, self._posted[i].incoming = self._posted[i].incoming, None
            return Event(kind, i, buf)
        if kind is Kind.DONE:
            return Event(kind, i, self._posted[i].done.copy())
        if kind is Kind.SAVED:
            epoch = int(self._posted[i].saved[0])
            self._post(Kind.SAVED, i)  # it may be asked to save again
            return Event(kind, i, epoch)
        self._requests[n] = self._wake()
        return Event(kind, i, None)

    def tell(self, i: int, message: np.ndarray) -> None:
        """Send worker ``i`` a control message (a command) without waiting; a worker that
        died meanwhile (ULFM) is found by the next wait."""
        self._told = [(m, r) for m, r in self._told if not ft.test(r)]  # keep only those in flight
        comm, _, rank = self.roster[i].link
        with ft.survivable():
            self._told.append((message, comm.Isend(message, dest=rank, tag=Tag.CONTROL)))

    def withdraw(self, i: int, *kinds: Kind) -> torch.Tensor | None:
        """Cancel worker ``i``'s receives of ``kinds`` (all three if none given); returns the
        exchange buffer if that receive was withdrawn. A message that matched meanwhile is
        discarded with it."""
        buf = None
        for kind in kinds or (Kind.EXCHANGE, Kind.DONE, Kind.SAVED):
            n = self._index[kind, i]
            if self._requests[n]:
                with ft.survivable():  # its worker died: nothing more can arrive
                    self._requests[n].Cancel()
                    self._requests[n].Wait()
                if kind is Kind.EXCHANGE:
                    buf, self._posted[i].incoming = self._posted[i].incoming, None
            self._requests[n] = MPI.REQUEST_NULL
        return buf

    def close(self) -> None:
        """Withdraw every receive still posted (at the end of the run)."""
        for i in range(len(self._posted)):
            self.withdraw(i)
        for (kind, _), request in zip(self._slots, self._requests):  # the wake-up call, the watches
            if kind in (Kind.WAKE, Kind.FAILED) and request:
                with ft.survivable():
                    request.Cancel()
                    request.Wait()
        self._requests = [MPI.REQUEST_NULL] * len(self._slots)
