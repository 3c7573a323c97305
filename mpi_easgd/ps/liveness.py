"""Liveness of the async roles: who is still there, on a communicator of its own.

MPI cannot tell a rank that waits in a blocking call (the server in ``Waitany``, a worker
in ``Sendrecv``) that its peer hung. A watchdog thread (:mod:`mpi_easgd.runtime.watchdog`) does, and
everything it sends or tests goes over ``live``, a duplicate of the run's communicator, so
that liveness traffic never matches a training receive. Async runs need
``MPI_THREAD_MULTIPLE`` for this (checked before any traffic).

- :class:`ServerLiveness`, on the server: watches the workers it waits for, sends every
  rank that may be waiting on the server a heartbeat each second, and reports a silent
  worker either by ending the job (``--on-worker-loss abort``) or as a *lost* event: a
  wake-up message to the server's own posted receive, after which :meth:`lost` says who.
- Under ULFM (:mod:`mpi_easgd.runtime.ft`) a heartbeat to a worker that died fails; that is not
  this thread's business (the server's main thread learns of the death from its receives).
- :func:`watch_server`, on a worker: the server is expected to answer while the worker
  waits on it; its heartbeats count as answers; DROPPED means this worker no longer counts.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
from mpi4py import MPI

from mpi_easgd.ps.protocol import Command, Inbox, Tag, control_message
from mpi_easgd.ps.roster import LOST, Roster
from mpi_easgd.runtime import ft
from mpi_easgd.runtime.watchdog import Watchdog, require_thread_multiple

_HEARTBEAT = control_message(Command.HEARTBEAT)  # read-only: one buffer serves every heartbeat


class ServerLiveness:
    """The server's watch on the workers of ``roster`` (by index); see the module docstring.

    Main thread: :meth:`expect` / :meth:`release` a worker's clock, :meth:`lost` (the workers
    found silent, once each), :meth:`dropped` (tell a worker), :attr:`replying`,
    :meth:`listen`. The watchdog thread sends heartbeats to every worker the roster still
    counts (it reads each record's link and state, see :mod:`.roster`) and to the extra
    listeners, and finds silent workers. Each thread owns the requests it makes; what the
    thread finds reaches the main thread under a lock."""

    def __init__(self, comm: MPI.Comm, live: MPI.Comm, roster: Roster, timeout: float, keep_going: bool) -> None:
        self.live, self.roster, self.timeout, self.keep_going = live, roster, timeout, keep_going
        self.replying: int | None = None  # the worker whose reply the server waits on
        # Other ranks that get heartbeats, as (communicator, rank): rebound, never mutated.
        self.listeners: tuple[tuple[MPI.Comm, int], ...] = ()
        self._lock = threading.Lock()
        self._silent: list[tuple[int, float]] = []  # (worker, seconds), found by the thread
        self._beats: list[MPI.Request] = []  # the thread's heartbeats in flight
        self._told: list[tuple[np.ndarray, MPI.Request]] = []  # the main thread's DROPPED messages in flight
        self._wake = np.zeros(1, dtype=np.int64)
        self.watchdog = Watchdog(comm, timeout, lambda i: f"worker rank {roster[i].rank}",
                                 on_silent=self._on_silent if keep_going else None,
                                 heard=self._heard, tick=self._heartbeat)

    def start(self) -> ServerLiveness:
        require_thread_multiple("the async server")
        for record in self.roster:
            self.expect(record.index)
        self.watchdog.start()
        return self

    def stop(self) -> None:
        self.watchdog.stop()

    def expect(self, i: int) -> None:
        """(Re)start worker ``i``'s clock: the server now waits for it."""
        self.watchdog.expect(i)

    def release(self, i: int) -> None:
        """The server does not wait for worker ``i`` (finished, or saved and waiting itself)."""
        self.watchdog.release(i)

    def wake_receive(self) -> MPI.Request:
        """The receive that the watchdog thread completes when it found a silent worker."""
        rank = self.live.Get_rank()
        return self.live.Irecv(self._wake, source=rank, tag=Tag.WAKE)

    @property
    def pending(self) -> bool:
        """Whether silent workers are waiting to be reported by :meth:`lost`."""
        with self._lock:
            return bool(self._silent)

    def lost(self) -> list[tuple[int, float]]:
        """The workers silent for longer than the timeout (index, seconds), each reported
        once; a worker heard from since the thread looked is not lost."""
        with self._lock:
            silent, self._silent = self._silent, []
        found = []
        for i, seconds in silent:
            if self.watchdog.silence(i) >= self.timeout:
                self.release(i)
                found.append((i, seconds))
        return found

    def dropped(self, i: int, died: bool = False) -> None:
        """Stop watching worker ``i`` and tell it that it no longer counts (in case it wakes
        up: it then stays idle; one that ``died`` is told nothing). Its record must be LOST
        already, so that it gets no more heartbeats."""
        self.release(i)
        if not died:
            _, live, rank = self.roster[i].link
            self._told = [(m, r) for m, r in self._told if not ft.test(r)]
            message = control_message(Command.DROPPED)
            self._told.append((message, live.Isend(message, dest=rank, tag=Tag.CONTROL)))

    def listen(self, live: MPI.Comm, rank: int) -> None:
        """Send ``rank`` of ``live`` heartbeats too (it now waits on the server)."""
        self.listeners = (*self.listeners, (live, rank))

    # ---- the watchdog thread -----------------------------------------------------------

    def _heard(self, i: int) -> float:
        """While the server is stuck replying to one worker, the others' messages wait
        unread: that silence is the server's, not theirs."""
        replying = self.replying
        return time.monotonic() if replying is not None and replying != i else 0.0

    def _on_silent(self, i: int, seconds: float) -> bool:
        """``--on-worker-loss continue``: queue the worker and wake the server up."""
        with self._lock:
            if any(j == i for j, _ in self._silent):
                return True
            self._silent.append((i, seconds))
        self.wake()
        return True

    def wake(self) -> None:
        """Wake the server's loop up (from another thread): it then looks at what is queued."""
        # A buffer of its own: MPICH refuses a send to self from the receive's buffer.
        self.live.Send(np.zeros(1, dtype=np.int64), dest=self.live.Get_rank(), tag=Tag.WAKE)

    def _heartbeat(self) -> None:
        """Tell every rank that may be waiting on the server that it lives (a worker can
        wait long and rightly: for a slow peer to reach a checkpoint, or to be dropped)."""
        self._beats = [r for r in self._beats if not ft.test(r)]
        links = [(r.link.live, r.link.rank) for r in self.roster if r.state is not LOST]
        for live, rank in links + list(self.listeners):
            with ft.survivable():  # it died: the main thread withdraws it
                self._beats.append(live.Isend(_HEARTBEAT, dest=rank, tag=Tag.CONTROL))


def say_dropped(rank: int) -> None:
    print(f"mpi_easgd: warning: the server dropped worker rank {rank} after it was silent "
          f"too long (--on-worker-loss continue); it stays idle until the job ends",
          file=sys.stderr, flush=True)


def watch_server(comm: MPI.Comm, inbox: Inbox, timeout: float) -> Watchdog:
    """A started watchdog on the server (key ``"server"``), fed by the liveness ``inbox``:
    the server's heartbeats count as signs of life (it may rightly keep this rank waiting,
    for a slow peer at a checkpoint or until a hung one is dropped). A worker the server
    dropped (it was slow, not dead) may be stuck in an exchange the server withdrew: then
    silence is expected, not a reason to end the job."""

    require_thread_multiple("an async worker")

    def server_silent(key, _seconds) -> bool:
        inbox.settle(1.0)
        if inbox.dropped:  # stuck in an exchange the server withdrew; the job's end ends it
            watchdog.release(key)
            say_dropped(comm.Get_rank())
            return True
        return time.monotonic() - inbox.last_heard < timeout  # a late heartbeat: alive

    watchdog = Watchdog(comm, timeout, lambda _: f"the server (rank {inbox.server})", on_silent=server_silent,
                        heard=lambda _: inbox.heard(), tick=inbox.pump,
                        record=lambda _: f"AsyncWorker: the server (rank {inbox.server})")
    return watchdog.start()
