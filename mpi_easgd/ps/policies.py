"""What the server does when it loses a worker (``--on-worker-loss``), one small object each.

A worker is *lost* when it was silent for ``--worker-timeout`` seconds (hung, as far as
anyone can tell) or, under ULFM (:mod:`mpi_easgd.runtime.ft`), when MPI reports that its
process *died*. The server withdraws what it had posted for the worker and asks its policy:

- :class:`Abort` (the default) ends the job with one line, naming the newest checkpoint;
- :class:`Continue` goes on without the worker (training, checkpoints, the summary), and
  ends the job only when no worker is left;
- :class:`Respawn` (ULFM) hands a dead worker's place to a spare process
  (:mod:`.spares`): the same rank, shard and exchange count, from the current center, once
  no checkpoint is under way; a hung worker it drops as :class:`Continue` does. A tester
  that died is replaced the same way (the others go on without evaluations, and rank 0
  evaluates the end).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

from mpi_easgd.ps.protocol import Tag, receive_object
from mpi_easgd.ps.roster import FINISHED, LOST, Link, Roster, WorkerRecord
from mpi_easgd.ps.spares import Spares
from mpi_easgd.runtime.control import PeerLost


def warn(message: str) -> None:
    print(f"mpi_easgd: warning: {message}", file=sys.stderr, flush=True)


class Abort:
    """End the job when a worker is lost."""

    name = "abort"
    keeps_going = False  # the liveness thread ends the job itself when a worker is silent

    def start(self) -> None:
        """Training begins."""

    def stop(self) -> None:
        """Training is over: no worker is replaced from now on."""

    def check(self, record: WorkerRecord, why: str, newest: str) -> None:
        """Before anything is withdrawn: raise if the run cannot go on without ``record``."""
        raise PeerLost(f"worker rank {record.rank} {why}; ending the job (--on-worker-loss continue would go "
                       f"on without it){newest}")

    def lost(self, roster: Roster, record: WorkerRecord, why: str, died: bool, newest: str) -> bool:
        """After ``record`` was withdrawn: whether a replacement will take its place."""
        raise AssertionError("check() ends the job first")

    def replacements(self) -> Iterator[tuple[WorkerRecord, Link]]:
        """The records to hand to a new process now, each with its new link."""
        return iter(())

    def tester(self, rank: int, evaluations: int):
        """(ULFM) The tester, rank ``rank``, died after ``evaluations``: the (messages,
        liveness) intercommunicators of a process that takes its place, or None (the run
        goes on without evaluations)."""
        return None

    def relayed(self, roster: Roster, timeout: float) -> dict[int, object]:
        """After the run: the statistics of every replacement, by the rank it stood in for."""
        return {}

    @property
    def spawn_seconds(self) -> list[float]:
        return []


class Continue(Abort):
    """Go on without a lost worker (``--on-worker-loss continue``)."""

    name = "continue"
    keeps_going = True

    def check(self, record: WorkerRecord, why: str, newest: str) -> None:
        pass

    def lost(self, roster: Roster, record: WorkerRecord, why: str, died: bool, newest: str) -> bool:
        left = sum(r.state is not LOST for r in roster)
        if not left:
            raise PeerLost(f"worker rank {record.rank} {why} and no other worker is left; ending the job{newest}")
        warn(f"worker rank {record.rank} {why}; dropped it, the run goes on with {left} "
             f"worker{'s' * (left != 1)} (--on-worker-loss {self.name})")
        return False


class Respawn(Continue):
    """Replace a worker that died by a spare process (``--on-worker-loss respawn``, ULFM)."""

    name = "respawn"

    def __init__(self, spares: Spares) -> None:
        self.spares = spares
        self.open = False  # workers may be replaced (while training goes on)
        self.waiting: list[WorkerRecord] = []  # dead, their replacement due once no checkpoint is under way

    def start(self) -> None:
        self.spares.spawn()  # ready before anyone dies
        self.open = True

    def stop(self) -> None:
        self.open = False

    def lost(self, roster: Roster, record: WorkerRecord, why: str, died: bool, newest: str) -> bool:
        if not (died and self.open):
            return super().lost(roster, record, why, died, newest)
        warn(f"worker rank {record.rank} {why}; a new process takes its place (--on-worker-loss respawn)")
        self.waiting.append(record)
        return True

    def tester(self, rank: int, evaluations: int):
        if not self.open:
            return None
        warn(f"the tester (rank {rank}) died; a new process takes its place after snapshot {evaluations} "
             f"(--on-worker-loss respawn)")
        return self.spares.assign(rank, role="tester", evaluations=evaluations)

    def replacements(self) -> Iterator[tuple[WorkerRecord, Link]]:
        while self.waiting and self.open:
            record = self.waiting.pop(0)
            comm, live = self.spares.assign(record.rank, exchanges=record.exchanges)
            record.replacements.append(dict(
                rank=record.rank, generation=self.spares.generation[record.rank], detected=record.deaths[-1],
                assigned=time.time(), first_exchange=None, exchanges_before=record.exchanges))
            yield record, Link(comm, live, 0)

    def relayed(self, roster: Roster, timeout: float) -> dict[int, object]:
        """A replacement sends its statistics to the server, the only rank it knows; then
        the spares are let go."""
        relayed, finished = {}, []
        for record in roster:
            if record.replacements and record.state is FINISHED:
                arrived, stats = receive_object(record.link.comm, 0, Tag.STATS, time.monotonic() + timeout)
                if not arrived:
                    raise PeerLost(f"the replacement of worker rank {record.rank} did not send its statistics "
                                   f"within --worker-timeout {timeout:g}s")
                relayed[record.rank] = stats
                finished.append(record.link.comm)
        self.spares.close(finished)
        return relayed

    @property
    def spawn_seconds(self) -> list[float]:
        return self.spares.spawn_seconds


def loss_policy(name: str, spares: Spares | None = None) -> Abort:
    """The policy called ``name`` (``--on-worker-loss``); respawn needs ``spares``."""
    if name == "respawn":
        if spares is None:
            raise ValueError("--on-worker-loss respawn needs spares")
        return Respawn(spares)
    return {"abort": Abort, "continue": Continue}[name]()
