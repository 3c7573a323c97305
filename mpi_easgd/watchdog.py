"""End the whole job when a peer this rank is waiting for has been silent too long.

Async roles wait in blocking MPI calls (the server in ``Waitany``, a worker in ``Sendrecv``):
no spinning, but also no way to notice a peer that hung (stopped, swapping, lost node). A
watchdog thread checks once a second how long each expected peer has been silent. A hung
rank cannot be removed from a running MPI job, so the job is ended with ``MPI_Abort`` and
a line naming the peer, instead of waiting forever.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from mpi4py import MPI


class Watchdog:
    """``expect(key)`` starts (or restarts) a peer's clock, ``release(key)`` stops it."""

    def __init__(self, comm: MPI.Comm, timeout: float, describe: Callable[[object], str]) -> None:
        self.comm = comm
        self.timeout = timeout
        self.describe = describe  # key -> "worker rank 2", "the server (rank 0)", ...
        self._since: dict[object, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mpi_easgd-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def expect(self, key) -> None:
        self._since[key] = time.monotonic()

    def release(self, key) -> None:
        self._since.pop(key, None)

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            now = time.monotonic()
            for key, since in list(self._since.items()):
                if now - since > self.timeout:
                    print(f"mpi_easgd: error: {self.describe(key)} sent nothing for {now - since:.0f}s "
                          f"(--worker-timeout {self.timeout:g}); it is hung or lost, ending the job",
                          file=sys.stderr, flush=True)
                    self.comm.Abort(1)  # MPI cannot drop one rank of a running job: end it loudly
