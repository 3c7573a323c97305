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

import time

import numpy as np
import torch
from mpi4py import MPI

from mpi_easgd.algorithms.easgd import ServerRule
from mpi_easgd.algorithms.protocol import DONE_LEN, Kind, Tag, meta_message
from mpi_easgd.flat import flat_buffer


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
    ) -> None:
        self.comm = comm
        self.center = center
        self.rule = rule
        self.workers = worker_ranks
        self.tester = tester_rank
        self.test_every = test_every
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
        start = time.perf_counter()
        self._last_snapshot = -float("inf")  # the first update is snapshot at once: the curve's start
        active = p
        while active:
            index = MPI.Request.Waitany(requests)
            t0 = time.perf_counter()
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
                active -= 1
            self._maybe_snapshot()
            self.busy_seconds += time.perf_counter() - t0
        MPI.Request.Waitall(reply)
        MPI.Request.Waitall(self._snap_reqs)
        self._send_snapshot(Kind.FINAL)
        MPI.Request.Waitall(self._snap_reqs)
        for r in recv + done + reply:
            r.Free()
        self.wall_seconds = time.perf_counter() - start

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
