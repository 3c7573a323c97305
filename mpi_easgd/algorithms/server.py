"""The parameter server: owns the center and serves every worker without blocking on any.

It keeps one persistent receive posted per worker (into a per-worker buffer) plus one for
that worker's DONE message, completes whichever arrives first with ``Waitany`` (a blocking
wait: no spinning on ``Test``, which would steal the CPU from workers sharing the node),
applies each exchange in arrival order and answers with a persistent nonblocking send from
a per-worker reply buffer. A slow worker therefore never stalls the others.

Every ``test_every`` seconds it hands the tester a snapshot of the center with a
nonblocking send, skipping a snapshot while the previous one is still in flight: the
server never waits for the tester until the final center.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import torch
from mpi4py import MPI

from mpi_easgd.algorithms.easgd import ServerRule
from mpi_easgd.algorithms.protocol import DONE_LEN, Kind, Tag, meta_message
from mpi_easgd.flat import flat_buffer


class PeerLost(RuntimeError):
    """A worker or the tester stopped answering for longer than the configured timeout."""


def wait_until(requests: list[MPI.Request], deadline: float) -> bool:
    """Wait for ``requests`` politely (test, then sleep) until ``deadline``; True if done."""
    delay = 1e-4
    while not MPI.Request.Testall(requests):
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return True


class Watchdog:
    """Ends the job when a worker has not been heard from for ``timeout`` seconds.

    The server blocks in ``Waitany`` (no spinning), so it cannot notice silence itself; this
    thread checks the time of each worker's last message once a second. A worker that
    stopped answering (hung, stopped, lost node) cannot be removed from a running MPI job,
    so the job ends with a message naming it instead of waiting forever.
    """

    def __init__(self, comm: MPI.Comm, workers: list[int], timeout: float) -> None:
        self.comm = comm
        self.workers = workers
        self.timeout = timeout
        self.last = {w: time.monotonic() for w in workers}
        self.done: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mpi_easgd-watchdog", daemon=True)

    def heard(self, worker: int) -> None:
        self.last[worker] = time.monotonic()

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            now = time.monotonic()
            for w in self.workers:
                if w not in self.done and now - self.last[w] > self.timeout:
                    print(f"mpi_easgd: error: worker rank {w} sent nothing for {now - self.last[w]:.0f}s "
                          f"(--worker-timeout {self.timeout:g}); it is hung or lost, ending the job",
                          file=sys.stderr, flush=True)
                    self.comm.Abort(1)  # MPI cannot drop one rank of a running job: end it loudly


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
        self.center = center
        self.rule = rule
        self.workers = worker_ranks
        self.tester = tester_rank
        self.test_every = test_every
        self.peer_timeout = peer_timeout
        self.samples_per_exchange = samples_per_exchange
        p, n = len(worker_ranks), center.numel()
        self.updates = 0
        self.exchanges = np.zeros(p, dtype=np.int64)
        self.last_seen = np.zeros(p, dtype=np.int64)  # self.updates at each worker's last exchange
        self.staleness: list[list[int]] = [[] for _ in range(p)]
        self.done = np.zeros((p, DONE_LEN), dtype=np.int64)
        self.audit = [] if audit else None
        self.initial = center.clone() if audit else None
        self._recv = [flat_buffer(n) for _ in range(p)]  # one buffer per worker
        self._reply = [flat_buffer(n) for _ in range(p)]
        self._scratch = flat_buffer(n)
        self._snapshot = flat_buffer(n)
        self._snap_reqs: list[MPI.Request] = []
        self._last_snapshot = 0.0
        self.busy_seconds = 0.0
        self.wall_seconds = 0.0

    def _send_snapshot(self, kind: Kind) -> None:
        self._snapshot.copy_(self.center)
        samples = int(np.maximum(self.exchanges - 1, 0).sum()) * self.samples_per_exchange
        self._meta = meta_message(kind, self.updates, samples)
        self._snap_reqs = [
            self.comm.Isend(self._meta, dest=self.tester, tag=Tag.SNAPSHOT_META),
            self.comm.Isend(self._snapshot.numpy(), dest=self.tester, tag=Tag.SNAPSHOT),
        ]
        self._last_snapshot = time.perf_counter()

    def _maybe_snapshot(self) -> None:
        if time.perf_counter() - self._last_snapshot < self.test_every:
            return
        if self._snap_reqs and not MPI.Request.Testall(self._snap_reqs):
            return  # the tester is still busy with the previous one: skip, never wait
        self._send_snapshot(Kind.SNAPSHOT)

    def run(self) -> None:
        comm, p = self.comm, len(self.workers)
        recv = [comm.Recv_init(self._recv[i].numpy(), source=w, tag=Tag.EXCHANGE)
                for i, w in enumerate(self.workers)]
        done = [comm.Recv_init(self.done[i], source=w, tag=Tag.DONE) for i, w in enumerate(self.workers)]
        reply = [comm.Send_init(self._reply[i].numpy(), dest=w, tag=Tag.REPLY)
                 for i, w in enumerate(self.workers)]
        requests = recv + done
        MPI.Prequest.Startall(requests)
        watchdog = Watchdog(comm, self.workers, self.peer_timeout).start()
        start = time.perf_counter()
        self._last_snapshot = -float("inf")  # the first update is snapshot at once: the curve's start
        active = p
        while active:
            index = MPI.Request.Waitany(requests)
            t0 = time.perf_counter()
            watchdog.heard(self.workers[index % p])
            if index < p:
                i = index
                reply[i].Wait()  # the previous reply to this worker has left its buffer
                if self.audit is not None:
                    self.audit.append((i, self._recv[i].clone()))
                self.rule.apply(self.center, self._recv[i], self._reply[i], self._scratch)
                reply[i].Start()
                recv[i].Start()
                if self.exchanges[i]:
                    self.staleness[i].append(int(self.updates - self.last_seen[i]))
                self.updates += 1
                self.exchanges[i] += 1
                self.last_seen[i] = self.updates
            else:
                i = index - p
                # DONE comes after the worker's last reply arrived: its exchange receive is
                # still posted and will never match, so withdraw it.
                recv[i].Cancel()
                recv[i].Wait()
                watchdog.done.add(self.workers[i])
                active -= 1
            self._maybe_snapshot()
            self.busy_seconds += time.perf_counter() - t0
        watchdog.stop()
        MPI.Request.Waitall(reply)
        # The tester never held training up; only the final center waits for it, bounded.
        deadline = time.monotonic() + self.peer_timeout
        if not wait_until(self._snap_reqs, deadline):
            raise PeerLost(self._tester_lost())
        self._send_snapshot(Kind.FINAL)
        if not wait_until(self._snap_reqs, deadline):
            raise PeerLost(self._tester_lost())
        for r in recv + done + reply:
            r.Free()
        self.wall_seconds = time.perf_counter() - start

    def _tester_lost(self) -> str:
        return (f"tester rank {self.tester} did not take the final center within "
                f"--worker-timeout {self.peer_timeout:g}s; training finished and the center is "
                f"saved as center.pt, but the run's summary is not written")

    def state_dict(self) -> dict:
        return {"center": self.center, "updates": self.updates, "exchanges": self.exchanges.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.center.copy_(state["center"])
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
