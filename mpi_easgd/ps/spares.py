"""Replacement workers (``--on-worker-loss respawn``): processes started with MPI Spawn
that stand in for workers that died.

The server keeps one *spare* ready. Spawned ahead of time (``MPI_Comm_spawn`` on the
server's ``COMM_SELF``: the spare and the server share an intercommunicator, nobody else
takes part), it is sent the run's set-up, imports torch, builds the model and reads the
dataset while training goes on, then waits. When a worker dies the server *assigns* the
spare: the dead worker's rank (so its shard and its checkpoint file) and exchange count,
then the current center; the replacement trains from there, and a new spare is spawned at
once. Only spawning costs the server time (it waits until the new process has started
MPI, a fraction of a second: ``import mpi_easgd`` is free of torch for this reason).

The spare's side is :mod:`mpi_easgd.ps.join`. Needs ULFM (:mod:`mpi_easgd.runtime.ft`): without it a
death ends the whole job before anything could replace it.
"""

from __future__ import annotations

import sys
import time

from mpi4py import MPI

from mpi_easgd.ps.protocol import Tag
from mpi_easgd.runtime import ft


class Spares:
    """The server's supply of replacement workers; ``setup`` is what a spare needs to
    prepare (picklable: the configuration, the run directory, the world size...)."""

    def __init__(self, setup: dict, command: list[str] | None = None) -> None:
        self.setup = setup
        # What a spare runs: python -m mpi_easgd.ps.join for the command line, a script's
        # own command line for AsyncTraining (the script becomes the replacement).
        self.command = command or ["-m", "mpi_easgd.ps.join"]
        # (messages, liveness, the requests that make the liveness channel and send the set-up)
        self.spare: tuple[MPI.Intercomm, MPI.Intercomm, list[MPI.Request]] | None = None
        self.generation: dict[int, int] = {}  # rank -> replacements of it so far
        self.spawn_seconds: list[float] = []  # how long each spawn held the server
        self.assigned: list[tuple[MPI.Intercomm, MPI.Intercomm]] = []

    def spawn(self) -> None:
        """Start the next spare (returns once it has started MPI)."""
        t0 = time.perf_counter()
        child = MPI.COMM_SELF.Spawn(sys.executable, self.command, maxprocs=1)
        # Its liveness channel, as every worker has (see liveness.py), and the set-up: neither
        # waited for here. A rerun script takes them only once it reaches AsyncTraining,
        # after its own imports, and over TCP even the first small send waits for the
        # peer's progress (a blocking send held the server 2.5 s per spawn).
        live, made = child.Idup()
        self.spare = (child, live, [made, child.isend(self.setup, dest=0, tag=Tag.JOIN)])
        self.spawn_seconds.append(time.perf_counter() - t0)

    def assign(self, rank: int, **job) -> tuple[MPI.Intercomm, MPI.Intercomm]:
        """Make the spare the process of ``rank``, spawn the next one; returns the
        replacement's (messages, liveness) intercommunicators, on which it is rank 0.
        ``job``: a worker's ``exchanges`` (those the dead one had made; the caller then
        sends it the center, tag START), or ``role="tester"`` and the ``evaluations`` made
        so far (the server lets a tester's intercommunicators go after the summary)."""
        if self.spare is None:
            self.spawn()
        child, live, started = self.spare
        MPI.Request.Waitall(started)  # (the spare is this far by now, or the replacement could not start anyway)
        generation = self.generation[rank] = self.generation.get(rank, 0) + 1
        child.send(dict(rank=rank, generation=generation, **job), dest=0, tag=Tag.JOIN)
        if job.get("role") != "tester":
            self.assigned.append((child, live))
        self.spare = None
        self.spawn()
        return child, live

    def close(self, finished: list[MPI.Intercomm]) -> None:
        """At the end: tell the spare it is not needed, and disconnect from it and from the
        replacements in ``finished`` (each has sent its statistics). A replacement that
        died is only freed: there is nobody to disconnect from."""
        if self.spare is not None:
            child, live, started = self.spare
            with ft.survivable() as death:  # (a spare that died before it took its set-up: only freed)
                MPI.Request.Waitall(started)
                child.send(None, dest=0, tag=Tag.JOIN)
            finished = finished if death else [*finished, child]
            self.assigned.append((child, live))
            self.spare = None
        let_go(self.assigned, lambda child: any(child == f for f in finished))
        self.assigned = []


def let_go(links: list[tuple[MPI.Intercomm, MPI.Intercomm]], finished) -> None:
    """Disconnect from each spawned process's (messages, liveness) intercommunicators in
    ``links`` that ``finished(messages)`` says is done; only free a dead one's (there is
    nobody to disconnect from)."""
    for comm, live in links:
        if finished(comm):
            live.Disconnect()
            comm.Disconnect()
        else:
            for c in (live, comm):
                with ft.survivable():
                    c.Free()
