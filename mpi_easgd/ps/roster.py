"""What the server knows of its workers: one record per worker, read by every part.

A :class:`WorkerRecord` holds a worker's rank, where it is reached (its :class:`Link`),
where it is in the run (:class:`State`), its counters and the server's statistics of it.
The server's dispatch loop, its posted receives (:mod:`.endpoints`), its liveness thread
(:mod:`.liveness`) and the worker-loss policies (:mod:`.policies`) all read the same
record; nobody keeps a copy. A replacement worker changes only the record's link.

Threads: the liveness thread reads :attr:`WorkerRecord.link` and :attr:`WorkerRecord.state`
(each one attribute, replaced whole by the main thread, never changed in place); every
other field is the main thread's.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from mpi4py import MPI

from mpi_easgd.ps.wire import ServerChannel


class State(enum.Enum):
    """Where a worker is, as the server sees it."""

    TRAINING = "training"  # exchanging; expected to be heard from
    FINISHED = "finished"  # sent DONE; still answers checkpoint commands
    LOST = "lost"  # dropped or dead: its receives are withdrawn


TRAINING, FINISHED, LOST = State.TRAINING, State.FINISHED, State.LOST


class Link(NamedTuple):
    """Where a worker's messages travel: the run's communicator, its liveness duplicate,
    and the worker's rank on them (a replacement: rank 0 of the intercommunicators that
    started it)."""

    comm: MPI.Comm
    live: MPI.Comm
    rank: int


@dataclass
class WorkerRecord:
    """One worker, as the server knows it (see the module docstring)."""

    index: int  # its shard among the workers
    rank: int  # its rank in the run (a replacement: the rank it stands in for)
    link: Link
    state: State = TRAINING
    exchanges: int = 0  # over every segment of a resumed run
    last_seen: int = 0  # center updates when it last exchanged
    # Staleness (center updates by others between two of its exchanges): count, sum, max.
    staleness: list[int] = field(default_factory=lambda: [0, 0, 0])
    totals: tuple[int, ...] = (0, 0, 0, 0)  # its DONE message: exchanges, steps, samples, stopped
    epoch: int = 0  # the epoch it was in at its last save (-1: the save failed)
    deaths: list[float] = field(default_factory=list)  # (ULFM) when each death was known (time.time())
    replacements: list[dict] = field(default_factory=list)  # (respawn) each process that took its place
    channel: ServerChannel | None = None  # a compressed format's state for its exchanges (.wire)
    damped: int = 0  # exchanges damped for staleness (--max-staleness)
    join: dict | None = None  # a late joiner (.joiners): when it connected and made its first exchange (time.time())

    def staleness_at(self, updates: int) -> int:
        """Center updates by others since this worker's previous exchange, if one applied
        now, at version ``updates`` (0 at its first)."""
        return updates - self.last_seen if self.exchanges else 0

    def exchanged(self, updates: int) -> None:
        """Count an exchange applied when the center had seen ``updates`` updates."""
        if self.exchanges:
            stale = self.staleness_at(updates)
            self.staleness[0] += 1
            self.staleness[1] += stale
            self.staleness[2] = max(self.staleness[2], stale)
        self.exchanges += 1
        self.last_seen = updates + 1
        if self.replacements and self.replacements[-1]["first_exchange"] is None:
            self.replacements[-1]["first_exchange"] = time.time()

    @property
    def stopped(self) -> bool:
        """Whether it ended training early, on a stop signal (its DONE says so)."""
        return bool(self.totals[3])

    def row(self) -> dict:
        """The server's statistics of this worker (one row of the summary's ``per_worker``)."""
        count, total, most = self.staleness
        joined = {}
        if self.join is not None:  # (a late joiner: from its connection to its first exchange)
            first = self.join["first_exchange"]
            joined = dict(joined=True, seconds_to_first_exchange=first - self.join["connected"] if first else None)
        return dict(rank=self.rank, server_exchanges=self.exchanges,
                    staleness_mean=total / count if count else 0.0, staleness_max=most,
                    reported_exchanges=int(self.totals[0]), damped=self.damped, **joined)


class Roster:
    """Every worker's record, by index (``roster[i]``, iteration in index order)."""

    def __init__(self, comm: MPI.Comm, live: MPI.Comm, ranks: list[int]) -> None:
        self.records = [WorkerRecord(i, rank, Link(comm, live, rank)) for i, rank in enumerate(ranks)]

    def add(self, rank: int, link: Link, updates: int, connected: float) -> WorkerRecord:
        """A late joiner's record (rank: a number past the run's ranks), at center version
        ``updates``; ``connected``: when (``time.time()``)."""
        record = WorkerRecord(len(self.records), rank, link, last_seen=updates,
                              join=dict(connected=connected, first_exchange=None))
        self.records.append(record)
        return record

    def __getitem__(self, i: int) -> WorkerRecord:
        return self.records[i]

    def __iter__(self):
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def where(self, *states: State) -> list[WorkerRecord]:
        """The records in any of ``states``."""
        return [r for r in self.records if r.state in states]

    @property
    def training(self) -> bool:
        return any(r.state is TRAINING for r in self.records)

    @property
    def stopped(self) -> bool:
        """Whether a worker ended training on a stop signal (then the whole run stops)."""
        return any(r.stopped for r in self.records)

    def samples(self, per_exchange: int) -> int:
        """Samples trained on before the center's current version (a worker's first
        exchange brings none)."""
        return sum(max(r.exchanges - 1, 0) for r in self.records) * per_exchange

    def rejoin(self) -> dict[str, dict]:
        """Where a resumed run restarts each lost worker: from the center, at the slowest
        remaining worker's epoch, with its exchange count."""
        epoch = min((r.epoch for r in self.records if r.state is not LOST), default=0)
        return {str(r.rank): dict(epoch=epoch, exchanges=r.exchanges) for r in self.where(LOST)}

    def state_dict(self) -> dict:
        return {"exchanges": [r.exchanges for r in self.records], "last_seen": [r.last_seen for r in self.records],
                "staleness": [list(r.staleness) for r in self.records], "damped": [r.damped for r in self.records]}

    def load_state_dict(self, state: dict, updates: int) -> None:
        """Each worker's counters as saved; none when the workers were others (a resume at
        another size: every worker starts afresh from the center)."""
        if len(state["exchanges"]) < len(self.records):
            for r in self.records:
                r.last_seen = updates
            return
        for i, r in enumerate(self.records):  # (a late joiner's counters, past the run's workers, are let go)
            r.exchanges = int(state["exchanges"][i])
            r.last_seen = int(state["last_seen"][i]) if "last_seen" in state else updates
            if "staleness" in state:
                r.staleness = [int(v) for v in state["staleness"][i]]
            r.damped = int(state["damped"][i]) if "damped" in state else 0
