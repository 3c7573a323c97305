"""The parameter server: owns the center and serves every worker without blocking on any.

It is assembled from parts that each do one thing:

- :mod:`.roster`: one record per worker (rank, link, state, counters), read by every part;
- :mod:`.endpoints`: the posted receives (each worker's exchange, DONE and SAVED, and the
  liveness thread's wake-up call) as typed events, the first to arrive first, and the
  server's commands to the workers;
- :mod:`.center`: the center as immutable versions and the buffer pool behind them;
- :mod:`.barrier`: when a checkpoint is due, and who still has to answer SAVE;
- :mod:`.liveness`: heartbeats and silent workers, on a communicator of its own;
- :mod:`.tester_feed`: snapshots of the center for the tester;
- :mod:`.policies`: what to do when a worker is lost (abort, continue, respawn).

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

A worker silent for ``--worker-timeout`` seconds, or (under ULFM, ``mpirun --with-ft
ulfm``, :mod:`mpi_easgd.runtime.ft`) one whose process *died*, which MPI makes known at
once by failing the server's receives from it, is *lost*: :meth:`Server._drop` withdraws
its receives, tells a hung one DROPPED in case it wakes up, and its policy
(:mod:`.policies`) ends the job, goes on without it, or hands its place to a spare
process (between checkpoints: one that is under way completes first). Rank 0 itself is
the run's single point of failure: its death ends the run, with the newest checkpoint
intact (with ``--servers S`` the other server ranks' deaths do not: :mod:`.shards`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from mpi4py import MPI

from mpi_easgd.compress import Codec
from mpi_easgd.ps.barrier import CheckpointBarrier, Phase
from mpi_easgd.ps.center import CenterVersions
from mpi_easgd.ps.endpoints import Endpoints, Kind
from mpi_easgd.ps.liveness import ServerLiveness
from mpi_easgd.ps.policies import Abort, warn
from mpi_easgd.ps.protocol import Command, ShardCommand, Tag, control_message, wait_politely
from mpi_easgd.ps.roster import FINISHED, LOST, TRAINING, Link, Roster, WorkerRecord
from mpi_easgd.ps.stats import ServerStats
from mpi_easgd.ps.tester_feed import TesterFeed
from mpi_easgd.ps.wire import ServerChannel
from mpi_easgd.rules.asynchronous import Arrival, ServerRule, message_kind
from mpi_easgd.rules.audit import AuditLog
from mpi_easgd.runtime import faults, ft
from mpi_easgd.runtime.control import PeerLost
from mpi_easgd.runtime.schedule import Schedule


@dataclass
class Totals:
    """The server's own counters, for the summary."""

    checkpoints: int = 0  # written
    checkpoint_seconds: float = 0.0  # from SAVE to commit, summed
    busy_seconds: float = 0.0  # handling events
    wall_seconds: float = 0.0
    checkpoint: Path | None = None  # the last one committed


class Server:
    """Serve ``worker_ranks`` on ``comm`` until each has sent DONE; see the module docstring.
    ``live`` is a duplicate of ``comm`` for liveness traffic (every rank makes it).

    ``save(step, manifest_extra, workers_written)`` is called once every worker has
    answered SAVE: it writes the server's part of checkpoint ``step`` and commits it,
    returning its directory (or, if a worker's write failed, removes it and raises).
    ``policy``: what to do when a worker is lost (:mod:`.policies`; default: end the job).
    ``wait_replies=False``: the workers overlap their exchanges (``--overlap-exchange``).
    ``shards``: with ``--servers S``, rank 0's side of the other server ranks
    (:class:`~mpi_easgd.ps.shards.ShardServers`): ``center`` is then shard 0, and they
    snapshot, save and drop workers with this server. ``doorway(wake)``: with
    ``--accept-joiners``, opens the door late joiners connect through
    (:class:`~mpi_easgd.ps.joiners.Doorway`).
    """

    def __init__(self, comm: MPI.Comm, live: MPI.Comm, center: torch.Tensor, rule: ServerRule,
                 worker_ranks: list[int], tester_rank: int, *, test_every: float, samples_per_exchange: int,
                 save: Callable[[int, dict, bool], Path], audit: bool = False, peer_timeout: float = 300.0,
                 policy: Abort | None = None, checkpoint_every: str = "", wire: torch.dtype | Codec = torch.float32,
                 wait_replies: bool = True, shards=None, doorway=None) -> None:
        self.save = save
        self.roster = Roster(comm, live, worker_ranks)
        self.versions = CenterVersions(center, rule, wire)  # messages and replies travel as wire
        self.state_messages = message_kind(rule.worker_rule) == "state"
        self._scratch: torch.Tensor | None = None  # what every compressed channel works in (made on first use)
        self.shards = shards  # the other server ranks' shards (--servers S; :class:`.shards.ShardServers`)
        self.feed = TesterFeed(comm, self.versions, tester_rank, test_every, samples_per_exchange,
                               on_send=shards and (lambda kind: shards.tell(ShardCommand.SNAPSHOT, int(kind))),
                               taken_over=shards and (lambda: shards.taken_over))
        if shards is not None:
            shards.updates = lambda: self.updates
        self.policy = policy or Abort()
        self.tester_rank = tester_rank
        self.tester_replacements: list[dict] = []  # (respawn) when each tester death was known, and its evaluations
        self.liveness = ServerLiveness(comm, live, self.roster, peer_timeout, self.policy.keeps_going)
        self.endpoints: Endpoints | None = None  # posted in run()
        self.schedule, self.barrier = Schedule(checkpoint_every), CheckpointBarrier()
        self.wait_replies = wait_replies
        self.open_door, self.doorway = doorway, None  # (--accept-joiners; opened in run())
        self.updates = 0  # the center's version
        self.totals = Totals()
        self.audit: AuditLog | None = AuditLog(center, rule) if audit else None
        self._fault = faults.from_env(comm.Get_rank())
        self._began = time.monotonic()  # (an arrival's time is counted from here)

    @property
    def center(self) -> torch.Tensor:
        return self.versions.current

    # ---- the dispatch loop -----------------------------------------------------------

    def run(self) -> None:
        """Serve until every worker is done or lost, then hand the tester the final center
        and write the final checkpoint."""
        self.endpoints = Endpoints(self.roster, self.versions.take, self.liveness.wake_receive,
                                   self.shards.watches() if self.shards is not None else [])
        if ft.enabled():
            self.endpoints.watch(self.feed.watch())  # (its death found at once, not at the next snapshot)
        self._connect(self.roster)  # every worker starts from the center as it is now
        self.liveness.start()
        start = time.perf_counter()
        self.policy.start()
        if self.open_door is not None:
            self.doorway = self.open_door(self.liveness.wake)
        self._serve(lambda: not self.roster.training and self.barrier.phase is Phase.IDLE)
        if self.doorway is not None:
            self.doorway.close()
        self.policy.stop()
        # The tester never held training up; only the final center waits for it, bounded.
        deadline = time.monotonic() + self.liveness.timeout
        if not self.feed.send_final(self.updates, self.roster, deadline):
            raise PeerLost(self._tester_lost())
        if not self.feed.lost:  # (ULFM: a dead tester's part falls to rank 0, see AsyncTraining)
            self.liveness.listen(self.feed.live or self.liveness.live, self.feed.tester)  # it waits for the statistics
        self._begin_checkpoint()
        self._serve(lambda: self.barrier.phase is Phase.IDLE)
        self.liveness.stop()
        # (the sends still in flight are the tester's snapshots: a dead tester's never end)
        if not self.feed.lost and not wait_politely(self.versions.requests(), deadline):
            raise PeerLost(self._tester_lost())
        self.endpoints.close()
        self.versions.settle()
        self.totals.wall_seconds = time.perf_counter() - start

    def _serve(self, until: Callable[[], bool]) -> None:
        """Handle arrivals until ``until()``."""
        while not until():
            event = self.endpoints.wait()
            t0 = time.perf_counter()
            record = self.roster[event.worker] if event.worker >= 0 else None
            if event.kind is Kind.EXCHANGE:
                self.liveness.expect(record.index)  # heard from it: restart its clock
                self._exchange(record, event.data)
                if self._fault:
                    self._fault.at_step(self.updates)
            elif event.kind is Kind.DONE:
                self._finished(record, event.data)
            elif event.kind is Kind.SAVED:  # its file is on disk; it waits for us until the checkpoint is complete
                self.liveness.release(record.index)
                record.epoch = event.data
                if self.barrier.saved(record.index, ok=event.data >= 0):
                    self._complete_checkpoint()
            elif event.kind is Kind.FAILED:  # a worker died (ULFM)
                self._failures()
            else:  # WAKE: the liveness thread found silent workers, or a joiner connected
                self._silent()
                self._admit()
            if self.barrier.phase is Phase.IDLE and self.roster.training and \
                    self.schedule.due(self.updates, time.monotonic()):
                self._begin_checkpoint()
            self.feed.offer(self.updates, self.roster)
            if self.feed.lost and not self.feed.final:
                self._replace_tester()
            self.totals.busy_seconds += time.perf_counter() - t0

    # ---- events ----------------------------------------------------------------------

    def _connect(self, records) -> None:
        """A compressed format's channels (:mod:`.wire`) for ``records``, from the current center."""
        if self.versions.codec is None:
            return
        if self._scratch is None:
            self._scratch = torch.empty_like(self.center)
        for record in records:
            if record.channel is None:
                record.channel = ServerChannel(self.versions.codec, self.center, self.state_messages, self._scratch)
            else:
                record.channel.reset(self.center)

    def _exchange(self, record: WorkerRecord, buf: torch.Tensor) -> None:
        if record.join is not None and record.join["first_exchange"] is None:
            record.join["first_exchange"] = time.time()
        arrival = Arrival(record.index, record.staleness_at(self.updates), self.updates,
                          time.monotonic() - self._began)
        record.damped += self.versions.rule.damps(arrival) != 1.0
        x = self.versions.arrived(buf, record.channel)
        if self.audit is not None:
            self.audit.record(arrival, x)  # as the rule gets it
        reply = self.versions.apply(x, arrival, record.channel)
        comm, _, rank = record.link
        with ft.survivable() as death:  # it died after sending (ULFM): its message counts, as sent
            sent = self.versions.send(comm, reply, rank, Tag.REPLY)
        self.endpoints.post_exchange(record.index, self.versions.take())
        record.exchanged(self.updates)
        self.updates += 1
        if death:
            self._failures()
        elif self.wait_replies:
            self._wait_for_reply(record, sent)

    def _wait_for_reply(self, record: WorkerRecord, sent: MPI.Request) -> None:
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
        self.liveness.replying, started = record.index, time.monotonic()
        while True:
            with ft.survivable() as death:  # it died waiting for the reply (ULFM)
                if sent.Test():
                    break
            if death:
                self._failures()
                break
            os.sched_yield()
            if self.liveness.pending:
                self._silent()
                if record.state is LOST:
                    break
        self.liveness.replying = None
        if time.monotonic() - started > self.liveness.timeout / 10:  # the others waited on the server
            for other in self.roster.where(TRAINING):
                if other is not record:
                    self.liveness.expect(other.index)

    def _finished(self, record: WorkerRecord, totals) -> None:
        """DONE comes after the worker's last reply arrived: its exchange receive is still
        posted and will never match, so withdraw it."""
        record.totals = tuple(int(v) for v in totals)
        self.versions.retire_after_sends(self.endpoints.withdraw(record.index, Kind.EXCHANGE))
        record.state = FINISHED
        if record.index in self.barrier.awaiting:
            self.liveness.expect(record.index)  # it still has to answer SAVE
        else:
            self.liveness.release(record.index)

    def _silent(self) -> None:
        for i, seconds in self.liveness.lost():
            self._drop(self.roster[i], f"sent nothing for {seconds:.0f}s (--worker-timeout "
                                       f"{self.liveness.timeout:g})")

    def _failures(self) -> None:
        """(ULFM) Take over the shard of every shard server that MPI says died
        (:mod:`.shards`), drop every worker that died, and note a dead tester (replaced
        after this event if the policy can, :meth:`_replace_tester`; else found again at
        the end: ``api._hand_to_tester``)."""
        self.feed.notice()
        for shard in self.shards.dead() if self.shards is not None else []:
            self.shards.take_over(shard)
        for record in self.roster:
            if record.state is not LOST and ft.is_dead(record.link.comm, record.link.rank):
                record.deaths.append(time.time())
                self._drop(record, "died (MPI reported its process failed)", died=True)

    def _drop(self, record: WorkerRecord, why: str, died: bool = False) -> None:
        """Withdraw everything posted for a lost worker and let the policy decide."""
        if record.state is LOST:
            return
        newest = f": {self.totals.checkpoint} is the newest checkpoint" if self.totals.checkpoint else ""
        self.policy.check(record, why, newest)  # (abort: ends the job here)
        self._withdraw(record)
        if self.shards is not None:
            self.shards.tell(ShardCommand.DROP, record.index)
        self.liveness.dropped(record.index, died)  # a hung one is told, in case it wakes up: it then stays idle
        replaced = self.policy.lost(self.roster, record, why, died, newest)
        if record.index in self.barrier.awaiting and self.barrier.lost(record.index):
            self._complete_checkpoint()  # (which then replaces it)
        elif replaced and self.barrier.phase is Phase.IDLE:
            self._replace_dead()
        self._admit()

    def _withdraw(self, record: WorkerRecord) -> None:
        """Withdraw everything posted for ``record`` and forget the sends to it: it is lost."""
        self.versions.retire_after_sends(self.endpoints.withdraw(record.index))  # (None if it had finished)
        self.versions.abandon(record.link.comm, record.link.rank)
        record.state = LOST

    def _admit(self) -> None:
        """Late joiners that connected (:mod:`.joiners`) become workers, from the current
        center, at the epoch the run has reached (the samples trained on, as the tester
        counts them); never during a checkpoint (they wait for its end)."""
        if self.doorway is None or self.barrier.phase is not Phase.IDLE or not self.roster.training:
            return
        for inter, live, connected in self.doorway.arrivals():
            epoch = int(self.roster.samples(self.feed.samples_per_exchange) // self.doorway.samples_per_epoch)
            joined = sum(r.join is not None for r in self.roster)
            record = self.roster.add(self.roster[0].link.comm.Get_size() + joined, Link(inter, live, 0), self.updates,
                                     connected)
            inter.send(dict(rank=record.rank, epoch=max(epoch, 0), joiner=joined), dest=0, tag=Tag.JOIN)
            self.versions.send(inter, self.center, 0, Tag.START)  # no copy: the center is immutable
            self._connect([record])
            self.endpoints.add(self.versions.take())
            self.liveness.expect(record.index)
            warn(f"a worker joined the run (rank {record.rank}, from epoch {max(epoch, 0) + 1}); "
                 f"{len(self.roster.where(TRAINING))} workers train now")

    def _replace_dead(self) -> None:
        """A new process takes each dead worker's place (``--on-worker-loss respawn``),
        starting from the current center; never during a checkpoint: no exchange may land
        then."""
        for record, link in self.policy.replacements():
            self.versions.send(link.comm, self.center, link.rank, Tag.START)  # no copy: the center is immutable
            record.link, record.state = link, TRAINING
            self._connect([record])
            self.endpoints.repost(record.index, self.versions.take())
            self.liveness.expect(record.index)

    # ---- checkpoints -----------------------------------------------------------------

    def _begin_checkpoint(self) -> None:
        members = {r.index for r in self.roster if r.state is not LOST}
        for i in self.barrier.begin(self.updates, members):
            self.endpoints.tell(i, control_message(Command.SAVE, self.barrier.step))
            self.liveness.expect(i)  # it must answer, even if it has finished
        if self.barrier.complete:
            self._complete_checkpoint()

    def _complete_checkpoint(self) -> None:
        lost = [r.rank for r in self.roster.where(LOST)]
        step, written, seconds = self.barrier.finish()
        if self.shards is not None:  # no exchange is in flight anywhere: every shard saves the same moment
            written = self.shards.save(step) and written
        stopped = self.roster.stopped
        finished = self.feed.final and not stopped and not lost  # a resume would have nothing to do
        self.totals.checkpoint = self.save(step, dict(lost_ranks=lost, rejoin=self.roster.rejoin(),
                                                      finished=finished), written)
        self.schedule.mark(self.updates, time.monotonic())
        self.totals.checkpoints += 1
        self.totals.checkpoint_seconds += seconds
        command = Command.END if self.feed.final else Command.RESUME
        for record in self.roster:
            if record.state is not LOST:
                self.endpoints.tell(record.index, control_message(command, step, int(stopped)))
            if record.state is TRAINING:
                self.liveness.expect(record.index)  # back to training: it must exchange again
        self._replace_dead()
        self._admit()

    # ---- the tester, state and statistics --------------------------------------------

    def _replace_tester(self) -> None:
        """(ULFM) The tester died: a new process takes its place if the policy has one
        (respawn); the snapshots in flight to the dead one are forgotten."""
        link = self.policy.tester(self.tester_rank, self.feed.snapshots)
        if link is None:
            return
        self.versions.abandon(self.feed.comm, self.feed.tester)
        self.feed.replace(*link)
        self.endpoints.watch(self.feed.watch())
        self.tester_replacements.append(dict(rank=self.tester_rank, generation=len(self.feed.replaced),
                                             assigned=time.time(), snapshots_before=self.feed.snapshots))

    def _tester_lost(self) -> str:
        self.versions.settle()  # so that center.pt holds the final center
        return (f"tester rank {self.feed.tester} did not take the final center within "
                f"--worker-timeout {self.liveness.timeout:g}s; training finished and the center is "
                f"saved as center.pt, but the run's summary is not written")

    def state_dict(self) -> dict:
        return {"center": self.center, "updates": self.updates, "snapshots": self.feed.snapshots,
                **self.roster.state_dict(), "rule": self.versions.rule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.versions.load(state["center"])
        self.updates = int(state["updates"])
        self.roster.load_state_dict(state, self.updates)
        self.feed.snapshots = int(state.get("snapshots", 0))
        self.versions.rule.load_state_dict(state.get("rule", {}))
        self.schedule.mark(self.updates, time.monotonic())
        if self.audit is not None:  # the log starts from the resumed center
            self.audit = AuditLog(self.center, self.versions.rule)

    def stats(self) -> ServerStats:
        """Per-worker exchange counts and staleness, checkpoints, losses (for the summary)."""
        wall = self.totals.wall_seconds
        return ServerStats(
            updates=self.updates, per_worker=[r.row() for r in self.roster], server_wall_seconds=wall,
            server_busy_fraction=self.totals.busy_seconds / wall if wall else 0.0, stopped=self.roster.stopped,
            checkpoint=str(self.totals.checkpoint), checkpoints=self.totals.checkpoints,
            checkpoint_seconds=self.totals.checkpoint_seconds, lost_workers=[r.rank for r in self.roster.where(LOST)],
            dead_workers=sorted(r.rank for r in self.roster if r.deaths),
            replacements=sorted((e for r in self.roster for e in r.replacements), key=lambda e: e["assigned"]),
            spawn_seconds=self.policy.spawn_seconds, tester_replacements=self.tester_replacements,
        )
