"""The parameter server: owns the center and serves every worker without blocking on any.

It keeps a nonblocking receive posted for every worker (into a buffer of its own) plus one
for that worker's DONE message, completes whichever arrives first with ``Waitany`` (a
blocking wait: no spinning on ``Test``, which would steal the CPU from workers sharing the
node), applies each exchange in arrival order and answers at once. The reply is a plain
send, because the worker is by protocol already waiting in its receive: the send finishes
at memory speed whatever that worker's pace, and it was measured 2.4x faster than a
nonblocking one, which MPICH only moves while the server is inside an MPI call. A worker
that hangs between its send and its receive is caught by the watchdog (which also ends
the job when a worker falls silent for ``--worker-timeout`` seconds).

The center is kept as immutable versions: an exchange writes the new center over the
buffer the worker's message arrived in (one fused pass) and sends the reply straight from
the old version (EASGD) or the new one (DOWNPOUR), with no copy. A buffer is reused only
when no send from it is in flight, so a slow receiver never sees a changing buffer and
the server never waits for it.

Every ``test_every`` seconds it hands the tester the current center with a nonblocking
send, skipping a snapshot while the previous one is still in flight: the server never
waits for the tester until the final center (and then only up to a timeout).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI

from mpi_easgd import faults
from mpi_easgd.algorithms.easgd import ServerRule
from mpi_easgd.algorithms.protocol import DONE_LEN, Kind, Tag, meta_message, wait_politely
from mpi_easgd.flat import flat_buffer
from mpi_easgd.watchdog import Watchdog


class PeerLost(RuntimeError):
    """A worker or the tester stopped answering for longer than the configured timeout."""


class BufferPool:
    """Flat buffers, recycled only when MPI is done reading them.

    A buffer is *released* when it stops being the center or a receive buffer; it returns
    to the free list once every send from it has completed.
    """

    def __init__(self, numel: int) -> None:
        self.numel = numel
        self._free: list[torch.Tensor] = []
        self._released: dict[int, torch.Tensor] = {}
        self._pending: dict[int, int] = {}
        self._sends: list[tuple[int, MPI.Request]] = []

    def take(self) -> torch.Tensor:
        self._reap()
        return self._free.pop() if self._free else flat_buffer(self.numel)

    def send(self, comm: MPI.Comm, buf: torch.Tensor, dest: int, tag: int) -> MPI.Request:
        request = comm.Isend(buf.numpy(), dest=dest, tag=tag)
        self._pending[id(buf)] = self._pending.get(id(buf), 0) + 1
        self._sends.append((id(buf), request))
        return request

    def release(self, buf: torch.Tensor) -> None:
        self._released[id(buf)] = buf

    def _reap(self) -> None:
        still = []
        for key, request in self._sends:
            if request.Test():
                self._pending[key] -= 1
            else:
                still.append((key, request))
        self._sends = still
        for key in [k for k in self._released if not self._pending.get(k)]:
            self._free.append(self._released.pop(key))

    def requests(self) -> list[MPI.Request]:
        return [r for _, r in self._sends]


class Server:
    """Serve ``worker_ranks`` on ``comm`` until each has sent DONE; see the module docstring."""

    def __init__(
        self,
        comm: MPI.Comm,
        center: torch.Tensor,
        rule: ServerRule,
        worker_ranks: list[int],
        tester_rank: int,
        *,
        test_every: float,
        samples_per_exchange: int,
        audit: bool = False,
        peer_timeout: float = 300.0,
    ) -> None:
        self.comm = comm
        self.home = center  # the model's own buffer: holds the center before and after run()
        self.center = center
        self.rule = rule
        self.workers = worker_ranks
        self.tester = tester_rank
        self.test_every = test_every
        self.peer_timeout = peer_timeout
        self.samples_per_exchange = samples_per_exchange
        p = len(worker_ranks)
        self.pool = BufferPool(center.numel())
        self.updates = 0
        self.exchanges = np.zeros(p, dtype=np.int64)
        self.last_seen = np.zeros(p, dtype=np.int64)  # self.updates at each worker's last exchange
        self.staleness: list[list[int]] = [[] for _ in range(p)]
        self.done = np.zeros((p, DONE_LEN), dtype=np.int64)
        self.audit = [] if audit else None
        self.initial = center.clone() if audit else None
        self._snap_reqs: list[MPI.Request] = []
        self._last_snapshot = 0.0
        self.busy_seconds = 0.0
        self.wall_seconds = 0.0

    def _send_snapshot(self, kind: Kind) -> None:
        samples = int(np.maximum(self.exchanges - 1, 0).sum()) * self.samples_per_exchange
        self._meta = meta_message(kind, self.updates, samples)
        self._snap_reqs = [
            self.comm.Isend(self._meta, dest=self.tester, tag=Tag.SNAPSHOT_META),
            self.pool.send(self.comm, self.center, self.tester, Tag.SNAPSHOT),  # no copy: immutable
        ]
        self._last_snapshot = time.perf_counter()

    def _maybe_snapshot(self) -> None:
        if time.perf_counter() - self._last_snapshot < self.test_every:
            return
        if self._snap_reqs and not MPI.Request.Testall(self._snap_reqs):
            return  # the tester is still busy with the previous one: skip, never wait
        self._send_snapshot(Kind.SNAPSHOT)

    def _retire(self, buf: torch.Tensor) -> None:
        if buf is not self.home:  # the model's buffer is never recycled
            self.pool.release(buf)

    def run(self) -> None:
        comm, p = self.comm, len(self.workers)
        incoming = [self.pool.take() for _ in range(p)]
        recv = [comm.Irecv(incoming[i].numpy(), source=w, tag=Tag.EXCHANGE) for i, w in enumerate(self.workers)]
        done = [comm.Irecv(self.done[i], source=w, tag=Tag.DONE) for i, w in enumerate(self.workers)]
        requests = recv + done
        watchdog = Watchdog(comm, self.peer_timeout, lambda w: f"worker rank {w}").start()
        for w in self.workers:
            watchdog.expect(w)
        fault = faults.from_env(comm.Get_rank())
        start = time.perf_counter()
        self._last_snapshot = -float("inf")  # the first update is snapshot at once: the curve's start
        active = p
        while active:
            index = MPI.Request.Waitany(requests)
            t0 = time.perf_counter()
            watchdog.expect(self.workers[index % p])  # heard from it: restart its clock
            if index < p:
                i = index
                x = incoming[i]
                if self.audit is not None:
                    self.audit.append((i, x.clone()))
                new, reply = self.rule.apply(self.center, x)
                # The worker is already waiting in its receive (it is inside Sendrecv), so this
                # completes at memory speed however slow the worker computes. A nonblocking
                # reply measured 2.4x slower: MPICH moves a large Isend only inside MPI calls,
                # and Waitany returns at the next arrival, stalling the reply meanwhile.
                comm.Send(reply.numpy(), dest=self.workers[i], tag=Tag.REPLY)
                if self.center is not new:
                    self._retire(self.center)
                self.center = new
                incoming[i] = self.pool.take()
                requests[i] = comm.Irecv(incoming[i].numpy(), source=self.workers[i], tag=Tag.EXCHANGE)
                if self.exchanges[i]:
                    self.staleness[i].append(int(self.updates - self.last_seen[i]))
                self.updates += 1
                self.exchanges[i] += 1
                self.last_seen[i] = self.updates
                if fault:
                    fault.at_step(self.updates)
            else:
                i = index - p
                # DONE comes after the worker's last reply arrived: its exchange receive is
                # still posted and will never match, so withdraw it.
                requests[i].Cancel()
                requests[i].Wait()
                self._retire(incoming[i])
                watchdog.release(self.workers[i])
                active -= 1
            self._maybe_snapshot()
            self.busy_seconds += time.perf_counter() - t0
        watchdog.stop()
        # The tester never held training up; only the final center waits for it, bounded.
        deadline = time.monotonic() + self.peer_timeout
        if not wait_politely(self._snap_reqs, deadline):
            raise PeerLost(self._tester_lost())
        self._send_snapshot(Kind.FINAL)
        if not wait_politely(self.pool.requests(), deadline):
            raise PeerLost(self._tester_lost())
        if self.center is not self.home:
            self.home.copy_(self.center)
            self.center = self.home
        self.wall_seconds = time.perf_counter() - start

    def _tester_lost(self) -> str:
        self.home.copy_(self.center)  # so that center.pt holds the final center
        return (f"tester rank {self.tester} did not take the final center within "
                f"--worker-timeout {self.peer_timeout:g}s; training finished and the center is "
                f"saved as center.pt, but the run's summary is not written")

    def state_dict(self) -> dict:
        return {"center": self.home, "updates": self.updates, "exchanges": self.exchanges.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.home.copy_(state["center"])
        self.center = self.home
        self.updates = int(state["updates"])
        self.exchanges[:] = state["exchanges"]

    def stats(self) -> dict:
        """Per-worker exchange counts and staleness, busy fraction (for the summary)."""
        per_worker = []
        for i, rank in enumerate(self.workers):
            s = np.asarray(self.staleness[i] or [0])
            per_worker.append(dict(
                rank=rank, server_exchanges=int(self.exchanges[i]),
                staleness_mean=float(s.mean()), staleness_max=int(s.max()),
                reported_exchanges=int(self.done[i][0]),
            ))
        return dict(
            updates=self.updates, per_worker=per_worker, server_wall_seconds=self.wall_seconds,
            stopped=bool(self.done[:, 3].any()),
            server_busy_fraction=self.busy_seconds / self.wall_seconds if self.wall_seconds else 0.0,
        )
