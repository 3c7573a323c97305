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

**A shard server that dies** (under ULFM, ``mpirun --with-ft ulfm``) does not end the run:
rank 0 takes its shard over. The replica is the shard's file in the newest checkpoint (the
center as it started, before the first): rank 0 learns of the death at once (a receive it
keeps posted from each shard server completes in error), builds a :class:`ShardServer`
for the shard from that file and runs it in a thread, on a communicator made for this at
the start (every rank's duplicate, ``spares``), so that nothing is renegotiated with the
other ranks. Whoever talks to shard k then finds it there, by one rule: rank k on the
run's communicator until rank k died, then rank 0 on ``spares[k]``. A worker whose
exchange with the dead rank failed takes no move on that shard (its reply is its own
message) and exchanges with rank 0 from then on; the tester reads from each snapshot's
meta message which shards rank 0 serves. The shard loses the exchanges applied since the
checkpoint (``server_takeovers`` in the summary counts them, with the takeover's times);
its audit stops (the other shards' replay). Compressed exchanges keep references per
shard on both ends, which the checkpoint does not hold for the workers: with them a shard
server's death still ends the run, and so does rank 0's.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import torch
from mpi4py import MPI

from mpi_easgd.ps.endpoints import Kind
from mpi_easgd.ps.protocol import CONTROL_LEN, ShardCommand, Tag, control_message, receive_object, wait_politely
from mpi_easgd.ps.protocol import Kind as SnapshotKind
from mpi_easgd.ps.roster import LOST
from mpi_easgd.ps.server import Server
from mpi_easgd.runtime import ft
from mpi_easgd.runtime.control import PeerLost
from mpi_easgd.transfer import mpi_view


def route(comm: MPI.Comm, shard: int, spares: dict[int, MPI.Comm], taken_over: bool) -> tuple[MPI.Comm, int]:
    """Where shard ``shard``'s server is reached: rank ``shard`` of ``comm``, or, once rank 0
    took it over, rank 0 of ``spares[shard]`` (the module docstring's rule)."""
    return (spares[shard], 0) if taken_over else (comm, shard)


class ShardServers:
    """Rank 0's side of the shard servers ``ranks`` of ``comm`` (every server rank but itself).
    ``spares`` (ULFM): each shard's communicator for a takeover; ``take_over(k)``: a
    :class:`ShardServer` for shard k on ``spares[k]`` from its newest replica, and what
    that replica is (module docstring)."""

    def __init__(self, comm: MPI.Comm, ranks: list[int], timeout: float, spares: dict[int, MPI.Comm] | None = None,
                 take_over=None) -> None:
        self.comm, self.ranks, self.timeout = comm, ranks, timeout
        self.spares, self._take_over = spares or {}, take_over
        self._told: list[tuple[np.ndarray, MPI.Request]] = []
        self._threads: dict[int, tuple[threading.Thread, ShardServer]] = {}  # shards rank 0 serves now
        self._errors: list[BaseException] = []
        self.takeovers: list[dict] = []  # (the summary's server_takeovers)
        self._watch = np.zeros((len(ranks), 1), dtype=np.int64)
        self.updates = lambda: 0  # rank 0's own shard's updates (its server sets this): what a takeover lost

    def _route(self, rank: int) -> tuple[MPI.Comm, int]:
        return route(self.comm, rank, self.spares, rank in self._threads)

    @property
    def taken_over(self) -> int:
        """The shards rank 0 serves in place of their dead server rank, as a bitmask."""
        return sum(1 << k for k in self._threads)

    def watches(self) -> list[MPI.Request]:
        """(ULFM, with spares) A receive posted from each shard server that nothing ever
        matches: it completes, in error, when that server dies."""
        if not self.spares:
            return []
        return [self.comm.Irecv(self._watch[i], source=k, tag=Tag.WATCH) for i, k in enumerate(self.ranks)]

    def dead(self) -> list[int]:
        """The shard server ranks that MPI says died and rank 0 has not taken over yet."""
        return [k for k in self.ranks if k not in self._threads and ft.is_dead(self.comm, k)]

    def take_over(self, shard: int) -> None:
        """Serve ``shard`` from its newest replica, in a thread, from now on (its server rank
        died)."""
        if not self.spares or self._take_over is None:
            raise PeerLost(f"shard server rank {shard} died, and its shard cannot be taken over (compressed "
                           f"exchanges keep references the checkpoint does not hold): ending the run")
        detected = time.time()
        server, replica = self._take_over(shard)
        server._fault = None  # (rank 0's injected faults are rank 0's own)
        thread = threading.Thread(target=self._serve, args=(server,), name=f"mpi_easgd-shard-{shard}", daemon=True)
        self._threads[shard] = (thread, server)
        thread.start()
        lost = max(self.updates() - server.updates, 0)  # (the shards differ by an exchange in flight at most)
        self.takeovers.append(dict(shard=shard, rank=shard, detected=detected, replica=replica,
                                   updates_restored=server.updates, lost_exchanges=lost, server=server))
        print(f"mpi_easgd: server rank {shard} died; rank 0 serves its shard of the center from {replica} "
              f"({self.takeovers[-1]['lost_exchanges']} exchanges since then are lost on it)", file=sys.stderr,
              flush=True)

    def _serve(self, server: ShardServer) -> None:
        try:
            server.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread at the end
            self._errors.append(exc)

    def tell(self, command: ShardCommand, value: int = 0) -> None:
        """Send every shard server ``command`` without waiting (a dead one not yet taken
        over misses it: its takeover starts from the newest checkpoint anyway)."""
        self._told = [(m, r) for m, r in self._told if not ft.test(r)]
        for rank in self.ranks:
            comm, dest = self._route(rank)
            message = control_message(command, value)
            with ft.survivable():
                self._told.append((message, comm.Isend(message, dest=dest, tag=Tag.SHARD)))

    def save(self, step: int) -> bool:
        """Have every shard server write its file of checkpoint ``step``; whether all did. A
        shard server that dies meanwhile is taken over and its new server asked again."""
        self.tell(ShardCommand.SAVE, step)
        deadline = time.monotonic() + self.timeout
        answers = np.zeros((len(self.ranks), 1), dtype=np.int64)
        for i, rank in enumerate(self.ranks):
            def answer(comm: MPI.Comm, source: int, rank=rank, i=i) -> None:
                if not wait_politely([comm.Irecv(answers[i], source=source, tag=Tag.SAVED)], deadline):
                    raise PeerLost(f"shard server rank {rank} did not write its checkpoint file within "
                                   f"--worker-timeout {self.timeout:g}s")

            self._from_shard(rank, answer, control_message(ShardCommand.SAVE, step))
        return bool(answers.all())

    def end(self, center: torch.Tensor, bounds: list[tuple[int, int]]) -> list[dict]:
        """Training is over: each shard server's final shard, written into ``center`` (the
        whole flat center) at its bounds, and its counters."""
        self.tell(ShardCommand.END)
        deadline = time.monotonic() + self.timeout
        counters: dict[int, dict] = {}  # (by rank: a receive after a takeover replaces the dead one's)
        for rank in self.ranks:
            start, stop = bounds[rank]

            def final(comm: MPI.Comm, source: int, rank=rank, start=start, stop=stop) -> None:
                if not wait_politely([comm.Irecv(mpi_view(center[start:stop]), source=source, tag=Tag.SHARD)],
                                     deadline):
                    raise PeerLost(f"shard server rank {rank} did not send its final shard within "
                                   f"--worker-timeout {self.timeout:g}s")
                counters[rank] = receive_object(comm, source, Tag.STATS, deadline)[1]

            # (it died at the end: its replica's shard is the final one)
            self._from_shard(rank, final, control_message(ShardCommand.END))
        wait_politely([r for _, r in self._told])
        for thread, _ in self._threads.values():
            thread.join()
        if self._errors:
            raise self._errors[0]
        return [counters[rank] for rank in self.ranks]

    def _from_shard(self, rank: int, receive, command: np.ndarray) -> None:
        """``receive(comm, source)`` from shard server ``rank``; if it died meanwhile, take its
        shard over, send the new server ``command`` (what the dead one was told) and receive
        again."""
        while True:
            comm, source = self._route(rank)
            with ft.survivable() as death:
                receive(comm, source)
            if not (death or rank in self.dead()):  # (a wait on a dead peer may also end with no error)
                return
            self.take_over(rank)
            comm, dest = self._route(rank)
            comm.Send(command, dest=dest, tag=Tag.SHARD)

    def takeover_rows(self) -> list[dict]:
        """The summary's ``server_takeovers``: each takeover's shard, replica, exchanges lost,
        and seconds from the death being known to the shard served again and to its first
        exchange."""
        rows = []
        for t in self.takeovers:
            server = t["server"]
            rows.append(dict({k: v for k, v in t.items() if k != "server"},
                             seconds_to_serving=server.serving_since - t["detected"] if server.serving_since else None,
                             seconds_to_first_exchange=server.first_exchange - t["detected"]
                             if server.first_exchange else None))
        return rows


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
        self.serving_since: float | None = None  # (a takeover's times, time.time())
        self.first_exchange: float | None = None

    def _listen(self) -> MPI.Request:
        """The receive of rank 0's next order (it takes the place of the liveness thread's
        wake-up call among the posted receives)."""
        return self.comm.Irecv(self._order, source=self.coordinator, tag=Tag.SHARD)

    def run(self) -> None:
        from mpi_easgd.ps.endpoints import Endpoints

        self.endpoints = Endpoints(self.roster, self.versions.take, self._listen)
        self._connect(self.roster)
        start = time.perf_counter()
        self.serving_since = time.time()
        going = True
        while going:
            event = self.endpoints.wait()
            t0 = time.perf_counter()
            if event.kind is Kind.EXCHANGE:
                self.first_exchange = self.first_exchange or time.time()
                self._exchange(self.roster[event.worker], event.data)
                if self._fault:  # (injected faults count its applied exchanges, as rank 0's do)
                    self._fault.at_step(self.updates)
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
            if self._fault and value == SnapshotKind.FINAL:
                self._fault.at("final")  # (injected: a death between the final snapshot's meta and this piece)
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
