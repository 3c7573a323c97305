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
from mpi_easgd.ps.protocol import Kind, Tag, meta_message, wait_politely


class TesterFeed:
    def __init__(self, comm: MPI.Comm, center: CenterVersions, tester: int, test_every: float) -> None:
        self.comm, self.center, self.tester, self.test_every = comm, center, tester, test_every
        self.snapshots = 0  # sent (the tester evaluates every one: its checkpoint state)
        self.final = False
        self._requests: list[MPI.Request] = []
        self._meta = np.zeros(0, dtype=np.int64)
        self._last = -float("inf")  # the first update is sent at once: the curve's start

    def offer(self, updates: int, samples: int) -> None:
        """Send the current center if a snapshot is due and the tester has taken the last."""
        if self.final or time.perf_counter() - self._last < self.test_every:
            return  # (after the final center, the tester takes nothing more)
        if self._requests and not MPI.Request.Testall(self._requests):
            return  # the tester is still busy with the previous one: skip, never wait
        self._send(Kind.SNAPSHOT, updates, samples)

    def send_final(self, updates: int, samples: int, deadline: float) -> bool:
        """Hand over the final center once the previous snapshot has gone (False if it did
        not by ``deadline``: the tester is hung or lost)."""
        if not wait_politely(self._requests, deadline):
            return False
        self._send(Kind.FINAL, updates, samples)
        self.final = True
        return True

    def _send(self, kind: Kind, updates: int, samples: int) -> None:
        self._meta = meta_message(kind, updates, samples)
        self._requests = [
            self.comm.Isend(self._meta, dest=self.tester, tag=Tag.SNAPSHOT_META),
            self.center.send(self.comm, self.center.current, self.tester, Tag.SNAPSHOT),  # no copy: immutable
        ]
        self.snapshots += 1
        self._last = time.perf_counter()
