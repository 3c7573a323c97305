"""Workers in groups (``--groups G`` or ``--groups node``): a level of synchronous
averaging under the asynchronous one, as in hierarchical parameter servers (HALoS, ps-lite
with local aggregation).

The workers are cut into groups: G consecutive workers, or ``node``, the workers that
share a node's memory (``MPI_Comm_split_type``). Every ``--group-tau`` steps a group
averages its members' parameters (one ``Allreduce`` on its own communicator, which never
leaves the node with ``node``). Every ``tau`` steps it also exchanges with the server:
the group averages first, then its first rank, the *leader*, makes the exchange on
behalf of the group with the averaged parameters, and it broadcasts the parameters
that result to the other members. Only leaders talk to the server, so the server (and its
shards) serves one exchange per group, each one bringing the samples of the whole group.

A stop signal takes effect at the next group round: each rank says there whether it was
asked to stop, and the whole group stops together. Members write no checkpoint file of
their own: a resumed member starts from its leader's parameters and position (its local
optimizer's state starts afresh). Every member of a group must take the same number of
steps (even shards: the command line's default). Groups work with blocking exchanges and
``--on-worker-loss abort``; the other settings are refused with a line saying so.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI

from mpi_easgd.flat import FlatParameters
from mpi_easgd.ps.stats import WorkerStats
from mpi_easgd.runtime.loop import Action, Position
from mpi_easgd.runtime.watchdog import CollectiveGuard
from mpi_easgd.transfer import MPIBuffer, allreduce, chunk_size

LEADER = 0  # a group's rank that talks to the server


def make_groups(comm: MPI.Comm, worker_ranks: list[int], groups: str) -> tuple[MPI.Comm | None, list[int]]:
    """On every rank of ``comm`` (a collective): this rank's group communicator (None off
    the workers, or without groups) and the rank (in ``comm``) of every group's leader."""
    if groups == "1":
        return None, list(worker_ranks)
    rank = comm.Get_rank()
    workers = comm.Split(0 if rank in worker_ranks else MPI.UNDEFINED, rank)
    group = None
    if workers != MPI.COMM_NULL:
        if groups == "node":
            group = workers.Split_type(MPI.COMM_TYPE_SHARED, key=workers.Get_rank())
        else:
            group = workers.Split(workers.Get_rank() // int(groups), workers.Get_rank())
        workers.Free()
    leaders = comm.allgather(rank if group is not None and group.Get_rank() == LEADER else None)
    return group, [r for r in leaders if r is not None]


class GroupRounds:
    """One group's synchronous rounds on ``comm`` (the group's communicator), over the
    flat parameters ``flat``: :meth:`average` every ``every`` steps and before each
    exchange, :meth:`share` (the leader's parameters to the others) after it."""

    def __init__(self, comm: MPI.Comm, flat: FlatParameters, every: int, tau: int, transfer: str,
                 timeout: float) -> None:
        self.comm, self.every, self.tau = comm, every, tau
        self.size, self.leads = comm.Get_size(), comm.Get_rank() == LEADER
        self.chunk_bytes = chunk_size()
        self.data = MPIBuffer(flat.data, transfer)
        self._flag = np.zeros(1, dtype=np.float64)
        self._guard = CollectiveGuard(comm, "WorkerGroup", timeout, "abort")
        self.rounds = 0
        self.seconds: list[float] = []  # each round's duration

    def due(self, t: int) -> bool:
        """Whether local step ``t`` starts with a group round."""
        return t % self.every == 0 or t % self.tau == 0

    def average(self, stop: bool) -> bool:
        """Average the group's parameters; whether any of its ranks was asked to stop."""
        t0 = time.perf_counter()
        with self._guard("average"):
            self.data.tensor.div_(self.size)
            self.data.before_send()
            allreduce(self.comm, self.data, self.chunk_bytes)  # (in pieces: one large Allreduce is slower)
            self.data.after_recv()
            self._flag[0] = float(stop)
            self.comm.Allreduce(MPI.IN_PLACE, self._flag, op=MPI.MAX)
        self.rounds += 1
        self.seconds.append(time.perf_counter() - t0)
        return bool(self._flag[0])

    def share(self) -> None:
        """The leader's parameters (after its exchange) to every member."""
        t0 = time.perf_counter()
        with self._guard("share"):
            self.data.before_send()
            self.comm.Bcast(self.data.mpi, root=LEADER)
            self.data.after_recv()
        self.seconds[-1] += time.perf_counter() - t0

    def start(self, position: Position) -> Position:
        """At the start (or a resume): the leader's parameters and position to the members;
        returns the position to go on from."""
        with self._guard("start"):
            self.data.before_send()
            self.comm.Bcast(self.data.mpi, root=LEADER)
            self.data.after_recv()
            state = self.comm.bcast(position.state_dict(), root=LEADER)
        return position if self.leads else Position.from_state(state)

    def end(self, step: int = 0, stopped: bool = False) -> tuple[int, bool]:
        """The run's end as the leader heard it from the server: (step of the final
        checkpoint, whether a stop signal ended the run)."""
        with self._guard("end"):
            return self.comm.bcast((step, stopped), root=LEADER)

    def close(self) -> None:
        self._guard.close()


class GroupMember:
    """A worker of a group that is not its leader: it trains its own shard with its own
    optimizer and meets its group in :class:`GroupRounds` (the interface of
    :class:`~mpi_easgd.ps.worker.AsyncWorker`, without a server)."""

    def __init__(self, ctx, flat: FlatParameters, optimizer: torch.optim.Optimizer, group: GroupRounds) -> None:
        self.ctx, self.cfg, self.flat, self.model = ctx, ctx.cfg, flat, flat.module
        self.optimizer, self.group = optimizer, group
        self.position = Position()
        self.stopping = False
        self.started = time.perf_counter()

    def step(self, pos: Position, has_grad: bool) -> None:
        if self.group.due(pos.t):
            self.stopping |= self.group.average(self.ctx.stop.requested)
            if pos.t % self.cfg.tau == 0:
                self.group.share()  # the parameters the leader's exchange left
        if has_grad:
            self.optimizer.step()

    def boundary(self, pos: Position) -> Action:
        return Action.STOP if self.stopping else Action.NONE

    def save(self, pos: Position) -> None:  # (never asked: the leader saves for the group)
        pass

    def end_epoch(self, pos: Position) -> None:
        pass

    def finish(self, pos: Position, stopped: bool) -> tuple[WorkerStats, int, bool]:
        """The leader's final exchange (averaged with the group first), then the end."""
        self.group.average(stopped)
        self.group.share()
        step, stopped = self.group.end()
        seconds = time.perf_counter() - self.started
        stats = WorkerStats.of(self.ctx.rank, self.group.rounds, pos.t, pos.samples, seconds, pos.skipped,
                               self.group.seconds or [0.0], sum(self.group.seconds), 0, (0, 0), None)
        return stats, step, stopped

    def close(self) -> None:
        self.group.close()
