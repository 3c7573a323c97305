"""The parameter server: owns the center and serves every worker without blocking on any.

It is assembled from parts that each do one thing:

- :mod:`.endpoints`: the posted receives (each worker's exchange, DONE and SAVED, and the
  liveness thread's wake-up call) as typed events, the first to arrive first;
- :mod:`.center`: the center as immutable versions and the buffer pool behind them;
- :mod:`.barrier`: when a checkpoint is due, and who still has to answer SAVE;
- :mod:`.liveness`: heartbeats and silent workers, on a communicator of its own;
- :mod:`.tester_feed`: snapshots of the center for the tester.

:meth:`Server._serve` is the dispatch loop. An exchange is applied in arrival order and
answered at once; the server waits for that reply to complete before anything else,
because the worker is by protocol already waiting in its receive: it finishes at memory
speed whatever that worker's pace (going back to ``Waitany`` first measured 2.4x slower:
MPICH moves a large send only while the server is inside an MPI call). Workers that
overlap their exchanges (``--overlap-exchange``) are not waiting: their replies complete
in the background.

Checkpoints (every ``--checkpoint-every`` center updates or seconds, and when training
ends) are coordinated by the server: it sends every worker a SAVE command; each worker
writes its file at its next step boundary, answers SAVED and waits. When all have answered
the server saves its own state and commits the checkpoint, then sends RESUME (or END when
training is over). No exchange is applied between a worker's save and the server's, so the
files are one consistent state of the whole run.

A worker silent for ``--worker-timeout`` seconds ends the job (``--on-worker-loss
abort``), or (``continue``) is dropped: its receives are withdrawn, it is told DROPPED in
case it wakes up, and training, checkpoints and the summary go on without it. Under ULFM
(``mpirun --with-ft ulfm``, :mod:`mpi_easgd.runtime.ft`) a worker that *dies* is known at once:
MPI fails the server's receives from it, and it is dropped the same way (or ends the job
under ``abort``), or (``respawn``) a spare process takes its place (:mod:`.spares`): the
dead worker's rank, shard and exchange count, from the current center (between
checkpoints: one that is under way completes first). The server itself is the run's
single point of failure: its death ends the run, with the newest checkpoint intact.
"""

from __future__ import annotations

import enum
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from mpi_easgd.ps.barrier import CheckpointBarrier, Phase
from mpi_easgd.ps.center import CenterVersions
from mpi_easgd.ps.endpoints import Endpoints, Kind
from mpi_easgd.ps.liveness import ServerLiveness
from mpi_easgd.ps.protocol import DONE_LEN, Command, Tag, control_message, receive_object, wait_politely
from mpi_easgd.ps.spares import Spares
from mpi_easgd.ps.tester_feed import TesterFeed
from mpi_easgd.rules.asynchronous import ServerRule
from mpi_easgd.runtime import faults, ft
from mpi_easgd.runtime.control import PeerLost
from mpi_easgd.runtime.schedule import Schedule


class WorkerState(enum.Enum):
    """Where each worker is, as the server sees it."""

    TRAINING = "training"  # exchanging; expected to be heard from
    FINISHED = "finished"  # sent DONE; still answers checkpoint commands
    LOST = "lost"  # dropped (--on-worker-loss continue): its receives are withdrawn


TRAINING, FINISHED, LOST = WorkerState.TRAINING, WorkerState.FINISHED, WorkerState.LOST


class Server:
    """Serve ``worker_ranks`` on ``comm`` until each has sent DONE; see the module docstring.
    ``live`` is a duplicate of ``comm`` for liveness traffic (every rank makes it).

    ``save(step, manifest_extra, workers_written)`` is called once every worker has
    answered SAVE: it writes the server's part of checkpoint ``step`` and commits it,
    returning its directory (or, if a worker's write failed, removes it and raises).
    """

    def __init__(
        self,
        comm: MPI.Comm,
        live: MPI.Comm,
        center: torch.Tensor,
        rule: ServerRule,
        worker_ranks: list[int],
        tester_rank: int,
        *,
        test_every: float,
        samples_per_exchange: int,
        save: Callable[[int, dict, bool], Path],
        audit: bool = False,
        peer_timeout: float = 300.0,
        on_worker_loss: str = "abort",
        checkpoint_every: str = "",
        wire: torch.dtype = torch.float32,
        wait_replies: bool = True,
        spares: Spares | None = None,
    ) -> None:
        self.comm, self.workers, self.tester = comm, list(worker_ranks), tester_rank
        # Where each worker is reached: (communicator, liveness communicator, its rank there).
        self.links: list[tuple[MPI.Comm, MPI.Comm, int]] = [(comm, live, r) for r in worker_ranks]
        self.versions = CenterVersions(center, rule, wire)  # messages and replies travel as wire
        self.feed = TesterFeed(comm, self.versions, tester_rank, test_every)
        self.liveness = ServerLiveness(comm, live, worker_ranks, peer_timeout, on_worker_loss != "abort")
        self.schedule = Schedule(checkpoint_every)
        self.barrier = CheckpointBarrier()
        self.peer_timeout, self.on_worker_loss = peer_timeout, on_worker_loss
        self.wait_replies = wait_replies  # False: the workers overlap their exchanges (--overlap-exchange)
        self.samples_per_exchange = samples_per_exchange
        self.save = save
        p = len(worker_ranks)
        self.status = [TRAINING] * p
        self.updates = 0
        self.exchanges = np.zeros(p, dtype=np.int64)
        self.last_seen = np.zeros(p, dtype=np.int64)  # self.updates at each worker's last exchange
        # Staleness (center updates by others between two of a worker's exchanges), over
        # every segment of a resumed run: count, sum and max per worker.
        self.staleness = np.zeros((p, 3), dtype=np.int64)
        self.done = np.zeros((p, DONE_LEN), dtype=np.int64)  # each worker's DONE totals
        self.epoch = np.zeros(p, dtype=np.int64)  # each worker's epoch at its last save (-1: failed)
        self.rejoin: dict[str, dict] = {}  # lost workers, as resumed runs restart them
        self.deaths: list[dict] = []  # (ULFM) workers that died: rank, when it was known (time.time())
        self.spares = spares  # --on-worker-loss respawn
        self.replacements: list[dict] = []  # rank, when its death was known, assigned, first exchange
        self._first: dict[int, dict] = {}  # worker -> its replacement's entry until it first exchanges
        self._to_replace: list[int] = []  # dead workers whose replacement waits for a checkpoint to end
        self.training = False  # workers may still be replaced
        self.audit = [] if audit else None
        self.initial: tuple[torch.Tensor, dict] | None = None  # audit: center and rule state at the start
        self.checkpoint: Path | None = None  # the last committed one
        self.checkpoints, self.checkpoint_seconds = 0, 0.0  # written, and from SAVE to commit
        self.busy_seconds = self.wall_seconds = 0.0
        self.endpoints: Endpoints | None = None  # posted in run()
        self._fault = faults.from_env(comm.Get_rank())
        self._notices: list[tuple[np.ndarray, MPI.Request]] = []

    @property
    def center(self) -> torch.Tensor:
        return self.versions.current

    # ---- the dispatch loop -----------------------------------------------------------

    def run(self) -> None:
        """Serve until every worker is done or lost, then hand the tester the final center
        and write the final checkpoint."""
        if self.audit is not None:
            self.initial = (self.center.clone(), self.versions.rule.state_dict())
        self.endpoints = Endpoints(self.comm, self.workers, self.versions.take, self.liveness.wake_receive)
        self.liveness.start()
        start = time.perf_counter()
        if self.spares is not None:
            self.spares.spawn()  # ready before anyone dies
        self.training = True
        self._serve(lambda: TRAINING not in self.status and self.barrier.phase is Phase.IDLE)
        self.training = False
        # The tester never held training up; only the final center waits for it, bounded.
        deadline = time.monotonic() + self.peer_timeout
        if not self.feed.send_final(self.updates, self._samples(), deadline):
            raise PeerLost(self._tester_lost())
        self.liveness.listen(self.liveness.live, self.tester)  # it now waits for the statistics
        self._begin_checkpoint()
        self._serve(lambda: self.barrier.phase is Phase.IDLE)
        self.liveness.stop()
        if not wait_politely(self.versions.requests(), deadline):
            raise PeerLost(self._tester_lost())
        self.endpoints.close()
        self.versions.settle()
        self.wall_seconds = time.perf_counter() - start

    def _serve(self, until: Callable[[], bool]) -> None:
        """Handle arrivals until ``until()``."""
        while not until():
            event = self.endpoints.wait()
            t0 = time.perf_counter()
            i = event.worker
            if event.kind is Kind.EXCHANGE:
                self.liveness.expect(i)  # heard from it: restart its clock
                self._exchange(i, event.data)
                if self._fault:
                    self._fault.at_step(self.updates)
            elif event.kind is Kind.DONE:
                self._finished(i, event.data)
            elif event.kind is Kind.SAVED:  # its file is on disk; it waits for us until the checkpoint is complete
                self.liveness.release(i)
                self.epoch[i] = event.data
                if self.barrier.saved(i, ok=event.data >= 0):
                    self._complete_checkpoint()
            elif event.kind is Kind.FAILED:  # a worker died (ULFM)
                self._failures()
            else:  # WAKE: the liveness thread found silent workers
                for i, seconds in self.liveness.lost():
                    self._drop(i, self._silent(seconds))
            if self.barrier.phase is Phase.IDLE and TRAINING in self.status and \
                    self.schedule.due(self.updates, time.monotonic()):
                self._begin_checkpoint()
            self.feed.offer(self.updates, self._samples())
            self.busy_seconds += time.perf_counter() - t0

    # ---- events ----------------------------------------------------------------------

    def _exchange(self, i: int, x: torch.Tensor) -> None:
        if i in self._first:
            self._first.pop(i)["first_exchange"] = time.time()
        if self.audit is not None:
            self.audit.append((i, x.to(torch.float32, copy=True)))  # as the rule gets it
        reply = self.versions.apply(x)
        comm, _, dest = self.links[i]
        try:
            sent = self.versions.send(comm, reply, dest, Tag.REPLY)
        except MPI.Exception as exc:  # it died after sending (ULFM): its message counts, as sent
            if not ft.is_failure(exc):
                raise
            sent = None
        self.endpoints.post_exchange(i, self.versions.take())
        if self.exchanges[i]:
            stale = self.updates - self.last_seen[i]
            self.staleness[i, :2] += (1, stale)
            self.staleness[i, 2] = max(self.staleness[i, 2], stale)
        self.updates += 1
        self.exchanges[i] += 1
        self.last_seen[i] = self.updates
        if sent is None:
            self._failures()
        elif self.wait_replies:
            self._wait_for_reply(i, sent)

    def _wait_for_reply(self, i: int, sent: MPI.Request) -> None:
        """A blocking worker is already waiting in its receive (inside Sendrecv), so waiting
        here completes at memory speed however slow the worker computes. Returning to the
        main wait instead measured 2.4x slower: MPICH moves a large send only inside MPI
        calls, and Waitany returns at the next arrival, stalling the reply meanwhile.
        Test in a loop, not Wait: a worker that hung inside its exchange must not hold the
        server here once liveness gives up on it (Waitany on the send and the wake-up call
        measured 4x slower than this loop). An overlapping worker (``--overlap-exchange``) is
        busy stepping and takes its reply in at its next step: then the reply completes in
        the background (its buffer is reused only once it has) while the server serves
        the others."""
        self.liveness.replying, started = i, time.monotonic()
        while True:
            try:
                if sent.Test():
                    break
            except MPI.Exception as exc:  # it died waiting for the reply (ULFM)
                if not ft.is_failure(exc):
                    raise
                self._failures()
                break
            os.sched_yield()
            if self.liveness.pending:
                for j, seconds in self.liveness.lost():
                    self._drop(j, self._silent(seconds))
                if self.status[i] is LOST:
                    break
        self.liveness.replying = None
        if time.monotonic() - started > self.peer_timeout / 10:  # the others waited on the server
            for j, status in enumerate(self.status):
                if j != i and status is TRAINING:
                    self.liveness.expect(j)

    def _finished(self, i: int, totals: np.ndarray) -> None:
        """DONE comes after the worker's last reply arrived: its exchange receive is still
        posted and will never match, so withdraw it."""
        self.done[i] = totals
        self.versions.retire_after_sends(self.endpoints.withdraw(i, Kind.EXCHANGE))
        self.status[i] = FINISHED
        if i in self.barrier.awaiting:
            self.liveness.expect(i)  # it still has to answer SAVE
        else:
            self.liveness.release(i)

    def _silent(self, seconds: float) -> str:
        return f"sent nothing for {seconds:.0f}s (--worker-timeout {self.peer_timeout:g})"

    def _failures(self) -> None:
        """(ULFM) Drop every worker that MPI says died. (A dead tester is found at the end:
        see ``asynchronous._hear_gathered``.)"""
        for i, (comm, _, dest) in enumerate(self.links):
            if self.status[i] is not LOST and ft.is_dead(comm, dest):
                self.deaths.append(dict(rank=self.workers[i], detected=time.time()))
                self._drop(i, "died (MPI reported its process failed)", died=True)

    def _drop(self, i: int, why: str, died: bool = False) -> None:
        """Go on without worker ``i`` (``--on-worker-loss continue``; else end the job)."""
        if self.status[i] is LOST:
            return
        rank = self.workers[i]
        newest = f": {self.checkpoint} is the newest checkpoint" if self.checkpoint else ""
        if not self.liveness.keep_going:
            raise PeerLost(f"worker rank {rank} {why}; ending the job (--on-worker-loss continue would go "
                           f"on without it){newest}")
        comm, _, dest = self.links[i]
        self.versions.retire_after_sends(self.endpoints.withdraw(i))  # (None if it had finished)
        self.versions.abandon(comm, dest)
        self.status[i] = LOST
        self._first.pop(i, None)
        self.liveness.dropped(i, died)  # a hung one is told, in case it wakes up: it then stays idle
        if died and self.spares is not None and self.training:
            print(f"mpi_easgd: warning: worker rank {rank} {why}; a new process takes its place "
                  f"(--on-worker-loss respawn)", file=sys.stderr, flush=True)
            self._to_replace.append(i)
            if i in self.barrier.awaiting and self.barrier.lost(i):
                self._complete_checkpoint()  # (which then replaces it)
            elif self.barrier.phase is Phase.IDLE:
                self._replace_dead()
            return
        left = sum(s is not LOST for s in self.status)
        if not left:
            raise PeerLost(f"worker rank {rank} {why} and no other worker is left; ending the job{newest}")
        print(f"mpi_easgd: warning: worker rank {rank} {why}; dropped it, the run goes on with {left} "
              f"worker{'s' * (left != 1)} (--on-worker-loss {self.on_worker_loss})", file=sys.stderr, flush=True)
        if i in self.barrier.awaiting and self.barrier.lost(i):
            self._complete_checkpoint()

    def _replace_dead(self) -> None:
        """``--on-worker-loss respawn``: a spare takes each dead worker's place, starting
        from the current center (never during a checkpoint: no exchange may land then)."""
        while self._to_replace and self.training:
            i = self._to_replace.pop(0)
            rank = self.workers[i]
            comm, live = self.spares.assign(rank, int(self.exchanges[i]))
            self.versions.send(comm, self.center, 0, Tag.START)  # no copy: the center is immutable
            self.links[i] = (comm, live, 0)
            self.endpoints.relink(i, comm, 0, self.versions.take())
            self.liveness.relink(i, live, 0)
            self.status[i] = TRAINING
            death = next(d for d in reversed(self.deaths) if d["rank"] == rank)
            entry = dict(rank=rank, generation=self.spares.generation[rank], detected=death["detected"],
                         assigned=time.time(), first_exchange=None, exchanges_before=int(self.exchanges[i]))
            self.replacements.append(entry)
            self._first[i] = entry

    def replacement_stats(self, timeout: float) -> dict[int, dict]:
        """After :meth:`run`: each replacement's statistics (it sends them to the server,
        the only rank it knows), by the rank it stood in for; then let the spares go."""
        if self.spares is None:
            return {}
        relayed, finished = {}, []
        for i, (comm, _, _) in enumerate(self.links):
            if comm is not self.comm and self.status[i] is FINISHED:
                arrived, stats = receive_object(comm, 0, Tag.STATS, time.monotonic() + timeout)
                if not arrived:
                    raise PeerLost(f"the replacement of worker rank {self.workers[i]} did not send its statistics "
                                   f"within --worker-timeout {timeout:g}s")
                relayed[self.workers[i]] = stats
                finished.append(comm)
        self.spares.close(finished)
        return relayed

    # ---- checkpoints -----------------------------------------------------------------

    def _tell(self, i: int, command: Command, flag: int = 0) -> None:
        message = control_message(command, self.barrier.step, flag)
        self._notices = [(m, r) for m, r in self._notices if not ft.test(r)]  # keep only those in flight
        comm, _, dest = self.links[i]
        try:
            self._notices.append((message, comm.Isend(message, dest=dest, tag=Tag.CONTROL)))
        except MPI.Exception as exc:  # it died (ULFM): the next wait reports it
            if not ft.is_failure(exc):
                raise

    def _begin_checkpoint(self) -> None:
        for i in self.barrier.begin(self.updates, {i for i, s in enumerate(self.status) if s is not LOST}):
            self._tell(i, Command.SAVE)
            self.liveness.expect(i)  # it must answer, even if it has finished
        if self.barrier.complete:
            self._complete_checkpoint()

    def _complete_checkpoint(self) -> None:
        lost = [self.workers[i] for i, s in enumerate(self.status) if s is LOST]
        if lost:  # where a resumed run restarts them: from the center, at the slowest survivor's epoch
            alive = [int(self.epoch[i]) for i, s in enumerate(self.status) if s is not LOST]
            for i, s in enumerate(self.status):
                if s is LOST:
                    self.rejoin[str(self.workers[i])] = dict(epoch=min(alive, default=0),
                                                             exchanges=int(self.exchanges[i]))
        step, written, seconds = self.barrier.finish()
        stopped = int(self.done[:, 3].any())
        finished = self.feed.final and not stopped and not lost  # a resume would have nothing to do
        self.checkpoint = self.save(step, dict(lost_ranks=lost, rejoin=self.rejoin, finished=finished), written)
        self.schedule.mark(self.updates, time.monotonic())
        self.checkpoints += 1
        self.checkpoint_seconds += seconds
        for i, s in enumerate(self.status):
            if s is not LOST:
                self._tell(i, Command.END if self.feed.final else Command.RESUME, stopped)
            if s is TRAINING:
                self.liveness.expect(i)  # back to training: it must exchange again
        self._replace_dead()

    # ---- the tester, state and statistics --------------------------------------------

    def _samples(self) -> int:
        """Samples trained on before the center's current version (a worker's first
        exchange brings none)."""
        return int(np.maximum(self.exchanges - 1, 0).sum()) * self.samples_per_exchange

    def _tester_lost(self) -> str:
        self.versions.settle()  # so that center.pt holds the final center
        return (f"tester rank {self.tester} did not take the final center within "
                f"--worker-timeout {self.peer_timeout:g}s; training finished and the center is "
                f"saved as center.pt, but the run's summary is not written")

    @property
    def snapshots(self) -> int:
        return self.feed.snapshots

    def state_dict(self) -> dict:
        return {"center": self.center, "updates": self.updates, "exchanges": self.exchanges.tolist(),
                "snapshots": self.snapshots, "last_seen": self.last_seen.tolist(),
                "staleness": self.staleness.tolist(), "rule": self.versions.rule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.versions.load(state["center"])
        self.updates = int(state["updates"])
        self.exchanges[:] = state["exchanges"]
        self.feed.snapshots = int(state.get("snapshots", 0))
        self.last_seen[:] = state.get("last_seen", self.updates)
        if "staleness" in state:
            self.staleness[:] = state["staleness"]
        self.versions.rule.load_state_dict(state.get("rule", {}))
        self.schedule.mark(self.updates, time.monotonic())

    def stats(self) -> dict:
        """Per-worker exchange counts and staleness, busy fraction (for the summary)."""
        per_worker = []
        for i, rank in enumerate(self.workers):
            count, total, most = (int(v) for v in self.staleness[i])
            per_worker.append(dict(
                rank=rank, server_exchanges=int(self.exchanges[i]),
                staleness_mean=total / count if count else 0.0, staleness_max=most,
                reported_exchanges=int(self.done[i][0]),
            ))
        return dict(
            updates=self.updates, per_worker=per_worker, server_wall_seconds=self.wall_seconds,
            stopped=bool(self.done[:, 3].any()), checkpoint=str(self.checkpoint),
            checkpoints=self.checkpoints, checkpoint_seconds=self.checkpoint_seconds,
            lost_workers=[self.workers[i] for i, s in enumerate(self.status) if s is LOST],
            dead_workers=sorted({d["rank"] for d in self.deaths}), deaths=self.deaths,
            replacements=self.replacements,
            spawn_seconds=self.spares.spawn_seconds if self.spares is not None else [],
            server_busy_fraction=self.busy_seconds / self.wall_seconds if self.wall_seconds else 0.0,
        )
