"""A center split over several server ranks (``--servers S``).

The center is cut into S contiguous shards of near-equal size
(:func:`~mpi_easgd.ps.protocol.shard_bounds`),
server rank k holding shard k. A worker's exchange is S exchanges at once, one per shard
(its message and reply cut the same way), and each server applies the rule to its shard
alone: exact for element-wise rules, which every built-in rule is. Each server's shard
sees the exchanges in its own arrival order, so the shards of one moment may differ by
an exchange or two in flight, as in any sharded parameter server.

Rank 0 stays the one that coordinates: the workers' liveness, commands and DONE, the
checkpoints, the tester's snapshots, the loss policy. The others are
:class:`ShardServer` s: they serve exchanges and follow rank 0's orders
(:class:`ShardCommand`, through :class:`ShardServers`), so that

- a checkpoint is one consistent state: when every worker has saved and waits, no
  exchange is in flight anywhere; rank 0 then has each shard server write its file, and
  commits once all have;
- the tester gets whole snapshots: rank 0 sends its shard, the others theirs when told;
- a worker dropped by rank 0 (``--on-worker-loss continue``) is dropped on every shard; a
  worker that died (ULFM) each server finds on its own;
- ``--audit`` logs each shard's exchanges on its own server (``audit-shard{k}.npz``),
  each replaying bit for bit;
- at the end, each shard server sends rank 0 its shard (``center.pt`` is whole) and its
  counters.

A server rank that dies ends the run (no shard has a replica yet).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI

from mpi_easgd.ps.endpoints import Kind
from mpi_easgd.ps.protocol import CONTROL_LEN, ShardCommand, Tag, control_message, receive_object, wait_politely
from mpi_easgd.ps.roster import LOST
from mpi_easgd.ps.server import Server
from mpi_easgd.runtime import ft
from mpi_easgd.runtime.control import PeerLost
from mpi_easgd.transfer import mpi_view


class ShardServers:
    """Rank 0's side of the shard servers ``ranks`` of ``comm`` (every server rank but itself)."""

    def __init__(self, comm: MPI.Comm, ranks: list[int], timeout: float) -> None:
        self.comm, self.ranks, self.timeout = comm, ranks, timeout
        self._told: list[tuple[np.ndarray, MPI.Request]] = []

    def tell(self, command: ShardCommand, value: int = 0) -> None:
        """Send every shard server ``command`` without waiting."""
        self._told = [(m, r) for m, r in self._told if not r.Test()]
        for rank in self.ranks:
            message = control_message(command, value)
            self._told.append((message, self.comm.Isend(message, dest=rank, tag=Tag.SHARD)))

    def save(self, step: int) -> bool:
        """Have every shard server write its file of checkpoint ``step``; whether all did."""
        self.tell(ShardCommand.SAVE, step)
        deadline = time.monotonic() + self.timeout
        answers = np.zeros((len(self.ranks), 1), dtype=np.int64)
        requests = [self.comm.Irecv(answers[i], source=rank, tag=Tag.SAVED) for i, rank in enumerate(self.ranks)]
        if not wait_politely(requests, deadline):
            raise PeerLost(f"a shard server (ranks {self.ranks}) did not write its checkpoint file within "
                           f"--worker-timeout {self.timeout:g}s")
        return bool(answers.all())

    def end(self, center: torch.Tensor, bounds: list[tuple[int, int]]) -> list[dict]:
        """Training is over: each shard server's final shard, written into ``center`` (the
        whole flat center) at its bounds, and its counters."""
        self.tell(ShardCommand.END)
        deadline = time.monotonic() + self.timeout
        counters = []
        for rank in self.ranks:
            start, stop = bounds[rank]
            if not wait_politely([self.comm.Irecv(mpi_view(center[start:stop]), source=rank, tag=Tag.SHARD)],
                                 deadline):
                raise PeerLost(f"shard server rank {rank} did not send its final shard within --worker-timeout "
                               f"{self.timeout:g}s")
            counters.append(receive_object(self.comm, rank, Tag.STATS, deadline)[1])
        wait_politely([r for _, r in self._told])
        return counters


class ShardServer(Server):
    """A server rank k > 0: serves its shard of the center to every worker and follows rank
    0's :class:`ShardCommand` s (module docstring). Built as a :class:`Server` on the shard
    (the rule, the versions, the exchanges, compressed channels and the audit are the same
    code); it has no liveness thread, checkpoint schedule or policy of its own."""

    def __init__(self, comm: MPI.Comm, live: MPI.Comm, center: torch.Tensor, rule, worker_ranks: list[int],
                 tester_rank: int, *, coordinator: int = 0, **options) -> None:
        super().__init__(comm, live, center, rule, worker_ranks, tester_rank, **options)
        self.comm, self.coordinator = comm, coordinator
        self._order = np.zeros(CONTROL_LEN, dtype=np.int64)

    def _listen(self) -> MPI.Request:
        """The receive of rank 0's next order (it takes the place of the liveness thread's
        wake-up call among the posted receives)."""
        return self.comm.Irecv(self._order, source=self.coordinator, tag=Tag.SHARD)

    def run(self) -> None:
        from mpi_easgd.ps.endpoints import Endpoints

        self.endpoints = Endpoints(self.roster, self.versions.take, self._listen)
        self._connect(self.roster)
        start = time.perf_counter()
        going = True
        while going:
            event = self.endpoints.wait()
            t0 = time.perf_counter()
            if event.kind is Kind.EXCHANGE:
                self._exchange(self.roster[event.worker], event.data)
            elif event.kind is Kind.FAILED:
                self._failures()
            elif event.kind is Kind.WAKE:
                going = self._obey(*(int(v) for v in self._order))
            self.totals.busy_seconds += time.perf_counter() - t0
        self.endpoints.close()
        self.totals.wall_seconds = time.perf_counter() - start

    def _obey(self, command: int, value: int, _flag: int) -> bool:
        """Carry out one order of rank 0; False once training is over (END)."""
        comm = self.comm
        if command == ShardCommand.SNAPSHOT:
            self.versions.send(comm, self.center, self.feed.tester, Tag.SNAPSHOT)  # no copy: immutable
        elif command == ShardCommand.SAVE:
            written = self.save(value, {}, True)
            comm.Send(np.array([int(bool(written))], dtype=np.int64), dest=self.coordinator, tag=Tag.SAVED)
        elif command == ShardCommand.DROP:
            self._forget(self.roster[value])
        else:  # END
            wait_politely(self.versions.requests())
            self.versions.settle()
            comm.Send(mpi_view(self.center), dest=self.coordinator, tag=Tag.SHARD)
            comm.send(dict(rank=comm.Get_rank(), updates=self.updates, busy_seconds=self.totals.busy_seconds,
                           damped=sum(r.damped for r in self.roster)), dest=self.coordinator, tag=Tag.STATS)
            return False
        return True

    def _forget(self, record) -> None:
        if record.state is not LOST:
            self._withdraw(record)

    def _failures(self) -> None:
        """(ULFM) Forget every worker that MPI says died (rank 0 decides what it means)."""
        for record in self.roster:
            if record.state is not LOST and ft.is_dead(record.link.comm, record.link.rank):
                self._forget(record)
