"""End the whole job when a peer this rank is waiting for has been silent too long; and
:class:`CollectiveGuard`, the watch on a call that every rank of a group must make.

Async roles wait in blocking MPI calls (the server in ``Waitany``, a worker in ``Sendrecv``):
no spinning, but also no way to notice a peer that hung (stopped, swapping, lost node). A
watchdog thread checks once a second how long each expected peer has been silent. A hung
rank cannot be removed from a running MPI job, so by default the job is ended with
``MPI_Abort`` and a line naming the peer, instead of waiting forever. A role that can go on
without the peer (the server under ``--on-worker-loss continue``) passes ``on_silent``.

Threads: the callbacks of the async roles make MPI calls from this thread (heartbeats,
the server's wake-up message, testing a posted receive), all on a communicator of their
own (:mod:`mpi_easgd.ps.liveness`), so those roles run only where MPI provides
``MPI_THREAD_MULTIPLE`` (checked before any traffic, see :func:`require_thread_multiple`).
The synchronous algorithms' guard makes no MPI call here but ``MPI_Abort``. An exception
in this thread ends the job with one line: liveness that stopped silently would let the
peers blame a healthy rank.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable

from mpi4py import MPI

from mpi_easgd.runtime import flight
from mpi_easgd.runtime.control import abort


class Watchdog:
    """``expect(key)`` starts (or restarts) a peer's clock, ``release(key)`` stops it."""

    def __init__(self, comm: MPI.Comm, timeout: float, describe: Callable[[object], str],
                 on_silent: Callable[[object, float], bool] | None = None,
                 heard: Callable[[object], float] | None = None,
                 tick: Callable[[], None] | None = None, record: Callable[[object], str] | None = None) -> None:
        self.comm = comm
        # this rank's own waits, by name, for the flight recorder (not the peers a server watches)
        self.record = record
        self.timeout = timeout
        self.describe = describe  # key -> "worker rank 2", "the server (rank 0)", ...
        # All three run on the watchdog thread:
        self.on_silent = on_silent  # (key, seconds) -> True if handled, else the job is aborted
        self.heard = heard  # key -> time.monotonic() of its last sign of life outside the watched wait
        self.tick = tick  # called every interval (e.g. to send heartbeats)
        self._since: dict[object, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mpi_easgd-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching; returns once the thread has made its last call (so the caller may
        then close what the callbacks use), or after 5 s."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def expect(self, key) -> None:
        self._since[key] = time.monotonic()
        if self.record is not None:
            flight.RECORDER.opened((id(self), key), self.record(key))

    def release(self, key) -> None:
        self._since.pop(key, None)
        if self.record is not None:
            flight.RECORDER.closed((id(self), key))

    def silence(self, key) -> float:
        """Seconds since ``key``'s clock was (re)started; 0 when it is not watched."""
        since = self._since.get(key)
        return 0.0 if since is None else time.monotonic() - since

    def _watch(self) -> None:
        try:
            self._watch_until_stopped()
        except BaseException as exc:  # noqa: BLE001 - a silent end would stop liveness (and heartbeats)
            print(f"mpi_easgd: error: the liveness thread failed ({type(exc).__name__}: {exc}); ending the job",
                  file=sys.stderr, flush=True)
            abort(self.comm, 1)

    def _watch_until_stopped(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            if self.tick is not None:
                self.tick()
            now = time.monotonic()
            for key, since in list(self._since.items()):
                if self.heard is not None:
                    since = max(since, self.heard(key))
                if now - since > self.timeout:
                    if self.record is not None:  # before anything ends the job
                        flight.RECORDER.dump(f"{self.describe(key)}: waited {now - since:.0f}s")
                    if self.on_silent is not None and self.on_silent(key, now - since):
                        continue  # handled: the handler releases the key if it is done with it
                    print(f"mpi_easgd: error: {self.describe(key)} sent nothing for {now - since:.0f}s "
                          f"(--worker-timeout {self.timeout:g}); it is hung or lost, ending the job",
                          file=sys.stderr, flush=True)
                    if self.record is not None:
                        time.sleep(flight.GATHER)  # the other ranks' watchdogs write their rings too
                    abort(self.comm, 1)  # MPI cannot drop one rank of a running job: end it loudly


def require_thread_multiple(what: str) -> None:
    """Raise a one-line error unless MPI allows calls from several threads at once."""
    provided = MPI.Query_thread()
    if provided != MPI.THREAD_MULTIPLE:
        names = {MPI.THREAD_SINGLE: "SINGLE", MPI.THREAD_FUNNELED: "FUNNELED", MPI.THREAD_SERIALIZED: "SERIALIZED"}
        raise RuntimeError(f"{what} needs an MPI library initialised with MPI_THREAD_MULTIPLE (its liveness thread "
                           f"sends heartbeats while training goes on); this one provides MPI_THREAD_"
                           f"{names.get(provided, provided)}: leave mpi4py.rc.thread_level at 'multiple', or use "
                           f"an MPI built with thread support")


class CollectiveGuard:
    """``with guard("call"):`` around a public call that runs collectives.

    A :class:`~mpi_easgd.runtime.watchdog.Watchdog` thread (no MPI call but ``MPI_Abort``) watches
    the call a rank is in. When it has waited ``timeout`` seconds for the other ranks, one
    line names it; with ``on_timeout="abort"`` the job then ends. The usual cause is a
    mismatch (a rank that exited, hung, or makes another call), which MPI would otherwise
    wait on forever. ``timeout=None``: no watching. Costs two dict operations a call.
    """

    def __init__(self, comm: MPI.Comm, owner: str, timeout: float | None, on_timeout: str) -> None:
        self.watchdog = _watchdog(comm, owner, timeout, on_timeout)
        self.call = ""
        self.seconds = 0.0  # spent in guarded calls, all told
        self._entered = 0.0
        if self.watchdog is not None:  # a guard nobody closed: its thread ends with the guard
            weakref.finalize(self, self.watchdog.stop)

    def __call__(self, call: str) -> CollectiveGuard:
        self.call = call
        return self

    def __enter__(self) -> None:
        self._entered = time.perf_counter()
        if self.watchdog is not None:
            self.watchdog.expect(self.call)

    def __exit__(self, *exc) -> None:
        if self.watchdog is not None:
            self.watchdog.release(self.call)
        self.seconds += time.perf_counter() - self._entered

    def close(self) -> None:
        """End the watchdog's thread (within a second; idempotent)."""
        if self.watchdog is not None:
            self.watchdog.stop()


def _watchdog(comm: MPI.Comm, owner: str, timeout: float | None, on_timeout: str):
    if on_timeout not in ("warn", "abort"):
        raise ValueError(f"on_timeout must be 'warn' or 'abort'; got {on_timeout!r}")
    if timeout is None:
        return None
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds or None; got {timeout!r}")
    rank = comm.Get_rank()
    watchdog: Watchdog
    _INSTANCES[owner] += 1
    name = f"{owner}#{_INSTANCES[owner]}"  # (the same on every rank that makes its objects in the same order)

    def on_silent(call: str, seconds: float) -> bool:
        what = "ending the job" if on_timeout == "abort" else "still waiting"
        print(f"mpi_easgd: rank {rank} has waited {seconds:.0f}s in {owner}.{call} for the other ranks: "
              f"one of them has exited, hung, or is making a different call (every rank must make the "
              f"same calls in the same order; a rank out of data calls synchronize when its epoch "
              f"ends); {what}; every rank's last calls: python -m mpi_easgd.flight "
              f"{flight.RECORDER.folder or os.environ.get(flight.FOLDER_ENV, 'mpi_easgd-flight')}",
              file=sys.stderr, flush=True)
        if on_timeout == "abort":
            time.sleep(flight.GATHER)  # the other ranks' watchdogs write their rings too
            abort(comm, 1)
        watchdog.release(call)  # said once per call
        return True

    watchdog = Watchdog(comm, timeout, lambda call: f"{owner}.{call} on rank {rank}", on_silent=on_silent,
                        record=lambda call: f"{name}.{call}")
    return watchdog.start()


_INSTANCES: collections.Counter[str] = collections.Counter()  # guards made so far in this process, by owner
