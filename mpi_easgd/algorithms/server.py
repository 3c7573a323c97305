"""The parameter server: owns the center and serves every worker without blocking on any.

It keeps a nonblocking receive posted for every worker (into a buffer of its own) plus
ones for that worker's DONE and SAVED messages and the watchdog's wake-up call, completes
whichever arrives first with ``Waitany`` (a blocking wait: no spinning on ``Test``, which
would steal the CPU from workers sharing the node), applies each exchange in arrival order
and answers at once. The server waits for the reply to complete before anything else,
because the worker is by protocol already waiting in its receive: it finishes at memory
speed whatever that worker's pace (going back to ``Waitany`` first measured 2.4x slower:
MPICH moves a large send only while the server is inside an MPI call).

The center is kept as immutable versions: an exchange writes the new center over the
buffer the worker's message arrived in (one fused pass) and sends the reply straight from
the old version (EASGD) or the new one (DOWNPOUR), with no copy. A buffer is reused only
when no send from it is in flight, so a slow receiver never sees a changing buffer and
the server never waits for it.

Every ``test_every`` seconds it hands the tester the current center with a nonblocking
send, skipping a snapshot while the previous one is still in flight: the server never
waits for the tester until the final center (and then only up to a timeout).

Checkpoints (every ``--checkpoint-every`` center updates or seconds, and when training
ends) are coordinated by the server: it sends every worker a SAVE command; each worker
writes its file at its next step boundary, answers SAVED and waits. When all have answered
the server saves its own state and commits the checkpoint, then sends RESUME (or END when
training is over). No exchange is applied between a worker's save and the server's, so the
files are one consistent state of the whole run.

A worker silent for ``--worker-timeout`` seconds ends the job (``--on-worker-loss
abort``), or (``continue``) is dropped: its messages are withdrawn, it is told DROPPED in
case it wakes up, and training, checkpoints and the summary go on without it.
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

from mpi_easgd import faults
from mpi_easgd.algorithms.barrier import CheckpointBarrier, Phase, Schedule
from mpi_easgd.algorithms.easgd import ServerRule
from mpi_easgd.algorithms.protocol import (
    DONE_LEN,
    SAVED_LEN,
    Command,
    Kind,
    Tag,
    control_message,
    meta_message,
    wait_politely,
)
from mpi_easgd.flat import flat_buffer
from mpi_easgd.watchdog import Watchdog


class PeerLost(RuntimeError):
    """A worker or the tester stopped answering for longer than the configured timeout."""


class BufferPool:
    """Flat buffers, recycled only when MPI is done reading them.

    A buffer is *released* when it stops being the center or a receive buffer; it returns
    to the free list once every send from it has completed.
    """

    def __init__(self, numel: int) -> None:
        self.numel = numel
        self._free: list[torch.Tensor] = []
        self._released: dict[int, torch.Tensor] = {}
        self._pending: dict[int, int] = {}
        self._sends: list[tuple[int, int, MPI.Request]] = []  # (buffer id, destination, request)

    def take(self) -> torch.Tensor:
        self._reap()
        return self._free.pop() if self._free else flat_buffer(self.numel)

    def send(self, comm: MPI.Comm, buf: torch.Tensor, dest: int, tag: int) -> MPI.Request:
        request = comm.Isend(buf.numpy(), dest=dest, tag=tag)
        self._pending[id(buf)] = self._pending.get(id(buf), 0) + 1
        self._sends.append((id(buf), dest, request))
        return request

    def abandon(self, dest: int) -> None:
        """Forget the sends to a lost rank; their buffers are never reused (MPI may still
        read them), a bounded leak of one buffer per lost worker."""
        self._sends = [s for s in self._sends if s[1] != dest]

    def release(self, buf: torch.Tensor) -> None:
        self._released[id(buf)] = buf

    def _reap(self) -> None:
        still = []
        for key, dest, request in self._sends:
            if request.Test():
                self._pending[key] -= 1
            else:
                still.append((key, dest, request))
        self._sends = still
        for key in [k for k in self._released if not self._pending.get(k)]:
            self._free.append(self._released.pop(key))

    def requests(self) -> list[MPI.Request]:
        return [r for _, _, r in self._sends]


class WorkerState(enum.Enum):
    """Where each worker is, as the server sees it."""

    TRAINING = "training"  # exchanging; expected to be heard from
    FINISHED = "finished"  # sent DONE; still answers checkpoint commands
    LOST = "lost"  # dropped (--on-worker-loss continue): its receives are withdrawn


TRAINING, FINISHED, LOST = WorkerState.TRAINING, WorkerState.FINISHED, WorkerState.LOST
_HEARTBEAT = control_message(Command.HEARTBEAT)


class Server:
    """Serve ``worker_ranks`` on ``comm`` until each has sent DONE; see the module docstring.

    ``save(step, manifest_extra, workers_written)`` is called once every worker has
    answered SAVE: it writes the server's part of checkpoint ``step`` and commits it,
    returning its directory (or, if a worker's write failed, removes it and raises).
    """

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
        save: Callable[[int, dict, bool], Path],
        audit: bool = False,
        peer_timeout: float = 300.0,
        on_worker_loss: str = "abort",
        checkpoint_every: str = "",
    ) -> None:
        self.comm = comm
        self.home = center  # the model's own buffer: holds the center before and after run()
        self.center = center
        self.rule = rule
        self.workers = worker_ranks
        self.tester = tester_rank
        self.test_every = test_every
        self.peer_timeout = peer_timeout
        self.samples_per_exchange = samples_per_exchange
        self.save = save
        self.keep_going = on_worker_loss == "continue"
        self.schedule = Schedule(checkpoint_every)
        self.barrier = CheckpointBarrier()
        p = len(worker_ranks)
        self.pool = BufferPool(center.numel())
        self.updates = 0
        self.snapshots = 0  # sent to the tester, which evaluates every one: its checkpoint state
        self.exchanges = np.zeros(p, dtype=np.int64)
        self.last_seen = np.zeros(p, dtype=np.int64)  # self.updates at each worker's last exchange
        # Staleness (center updates by others between two of a worker's exchanges), over
        # every segment of a resumed run: count, sum and max per worker.
        self.staleness = np.zeros((p, 3), dtype=np.int64)
        self.done = np.zeros((p, DONE_LEN), dtype=np.int64)
        self.status = [TRAINING] * p
        self.epoch = np.zeros((p, SAVED_LEN), dtype=np.int64)  # each worker's epoch at its last save (-1: failed)
        self.rejoin: dict[str, dict] = {}  # lost workers, as resumed runs restart them
        self.audit = [] if audit else None
        self.initial = center.clone() if audit else None
        self.checkpoint: Path | None = None  # the last committed one
        self.checkpoints, self.checkpoint_seconds = 0, 0.0  # written, and from SAVE to commit
        self._snap_reqs: list[MPI.Request] = []
        self._last_snapshot = 0.0
        self._final = False
        self._silent: list[tuple[int, float]] = []  # filled by the watchdog thread
        self._replying: int | None = None  # the worker whose reply the server waits on
        self._notices: list[tuple[np.ndarray, MPI.Request]] = []
        self._beats: list[MPI.Request] = []  # the watchdog thread's own
        self.busy_seconds = 0.0
        self.wall_seconds = 0.0

    # ---- the tester ----------------------------------------------------------------

    def _send_snapshot(self, kind: Kind) -> None:
        samples = int(np.maximum(self.exchanges - 1, 0).sum()) * self.samples_per_exchange
        self._meta = meta_message(kind, self.updates, samples)
        self._snap_reqs = [
            self.comm.Isend(self._meta, dest=self.tester, tag=Tag.SNAPSHOT_META),
            self.pool.send(self.comm, self.center, self.tester, Tag.SNAPSHOT),  # no copy: immutable
        ]
        self.snapshots += 1
        self._last_snapshot = time.perf_counter()

    def _maybe_snapshot(self) -> None:
        if self._final or time.perf_counter() - self._last_snapshot < self.test_every:
            return  # (after the final center, the tester takes nothing more)
        if self._snap_reqs and not MPI.Request.Testall(self._snap_reqs):
            return  # the tester is still busy with the previous one: skip, never wait
        self._send_snapshot(Kind.SNAPSHOT)

    def _tester_lost(self) -> str:
        self.home.copy_(self.center)  # so that center.pt holds the final center
        return (f"tester rank {self.tester} did not take the final center within "
                f"--worker-timeout {self.peer_timeout:g}s; training finished and the center is "
                f"saved as center.pt, but the run's summary is not written")

    # ---- checkpoints -----------------------------------------------------------------

    def _tell(self, i: int, command: Command, flag: int = 0) -> None:
        message = control_message(command, self.barrier.step, flag)
        self._notices = [(m, r) for m, r in self._notices if not r.Test()]  # keep only those in flight
        self._notices.append((message, self.comm.Isend(message, dest=self.workers[i], tag=Tag.CONTROL)))

    def _checkpoint_due(self) -> bool:
        if self.barrier.phase is not Phase.IDLE or TRAINING not in self.status:
            return False
        return self.schedule.due(self.updates, time.monotonic())

    def _begin_checkpoint(self) -> None:
        for i in self.barrier.begin(self.updates, {i for i, s in enumerate(self.status) if s != LOST}):
            self._tell(i, Command.SAVE)
            self._expect(i)  # it must answer, even if it has finished
        if self.barrier.complete:
            self._complete_checkpoint()

    def _complete_checkpoint(self) -> None:
        lost = [self.workers[i] for i, s in enumerate(self.status) if s == LOST]
        if lost:  # where a resumed run restarts them: from the center, at the slowest survivor's epoch
            alive = [int(self.epoch[i, 0]) for i, s in enumerate(self.status) if s != LOST]
            for i, s in enumerate(self.status):
                if s == LOST:
                    self.rejoin[str(self.workers[i])] = dict(epoch=min(alive, default=0),
                                                             exchanges=int(self.exchanges[i]))
        step, written, seconds = self.barrier.finish()
        stopped = int(self.done[:, 3].any())
        finished = self._final and not stopped and not lost  # a resume would have nothing to do
        self.checkpoint = self.save(step, dict(lost_ranks=lost, rejoin=self.rejoin, finished=finished), written)
        self.schedule.mark(self.updates, time.monotonic())
        self.checkpoints += 1
        self.checkpoint_seconds += seconds
        for i, s in enumerate(self.status):
            if s != LOST:
                self._tell(i, Command.END if self._final else Command.RESUME, stopped)
            if s == TRAINING:
                self._expect(i)  # back to training: it must exchange again

    # ---- lost workers ----------------------------------------------------------------

    def _expect(self, i: int) -> None:
        """(Re)start worker ``i``'s clock: the server now waits for it."""
        self._watchdog.expect(self.workers[i])

    def _heard(self, rank: int) -> float:
        """Watchdog thread: while the server is stuck replying to one worker, the others'
        messages wait unread; that silence is the server's, not theirs."""
        replying = self._replying
        if replying is not None and self.workers[replying] != rank:
            return time.monotonic()
        return 0.0

    def _on_silent(self, rank: int, seconds: float) -> bool:
        """Watchdog thread, ``--on-worker-loss continue``: queue the drop, wake the loop."""
        if all(r != rank for r, _ in self._silent):
            self._silent.append((rank, seconds))
            self.comm.Send(np.zeros(1, dtype=np.int64), dest=self.comm.Get_rank(), tag=Tag.WAKE)
        return True

    def _wake_up(self) -> None:
        """The watchdog found silent workers: re-arm its wake-up call and drop them."""
        self._requests[-1] = self.comm.Irecv(self._wake, source=self.comm.Get_rank(), tag=Tag.WAKE)
        self._drop_silent()

    def _drop_silent(self) -> None:
        while self._silent:
            rank, seconds = self._silent.pop(0)
            i = self.workers.index(rank)
            if self.status[i] == LOST:
                continue
            if self._watchdog.silence(rank) < self.peer_timeout:
                continue  # heard from (or released) since the watchdog looked: not lost
            self._drop(i, seconds)

    def _heartbeat(self) -> None:
        """Watchdog thread: tell every rank that may be waiting on this server that it lives
        (a worker can wait long and rightly: for a slow peer to reach a checkpoint, or to be
        dropped). The tester is told too once it waits for the run's statistics."""
        self._beats = [r for r in self._beats if not r.Test()]
        ranks = [w for w, s in zip(self.workers, self.status) if s != LOST] + [self.tester] * self._final
        for rank in ranks:  # one read-only buffer serves every heartbeat
            self._beats.append(self.comm.Isend(_HEARTBEAT, dest=rank, tag=Tag.CONTROL))

    def _drop(self, i: int, seconds: float) -> None:
        p = len(self.workers)
        for group in range(3):  # its exchange, DONE and SAVED receives: withdraw them
            request = self._requests[group * p + i]
            if request:
                request.Cancel()
                request.Wait()  # a message that matched meanwhile is discarded with it
            self._requests[group * p + i] = MPI.REQUEST_NULL
        if self.status[i] == TRAINING:  # a finished worker's buffer was retired at its DONE
            self._retire(self._incoming[i])
        self.pool.abandon(self.workers[i])
        self._watchdog.release(self.workers[i])
        self.status[i] = LOST
        self._tell(i, Command.DROPPED)  # in case it wakes up: it then stays idle
        left = sum(s != LOST for s in self.status)
        if not left:
            raise PeerLost(f"worker rank {self.workers[i]} sent nothing for {seconds:.0f}s (--worker-timeout "
                           f"{self.peer_timeout:g}) and no other worker is left; ending the job"
                           + (f": {self.checkpoint} is the newest checkpoint" if self.checkpoint else ""))
        print(f"mpi_easgd: warning: worker rank {self.workers[i]} sent nothing for {seconds:.0f}s "
              f"(--worker-timeout {self.peer_timeout:g}); dropped it, the run goes on with {left} "
              f"worker{'s' * (left != 1)} (--on-worker-loss continue)", file=sys.stderr, flush=True)
        if i in self.barrier.awaiting and self.barrier.lost(i):
            self._complete_checkpoint()

    # ---- the loop --------------------------------------------------------------------

    def _retire(self, buf: torch.Tensor) -> None:
        if buf is not self.home:  # the model's buffer is never recycled
            self.pool.release(buf)

    def _exchange(self, i: int) -> None:
        comm, x = self.comm, self._incoming[i]
        if self.audit is not None:
            self.audit.append((i, x.clone()))
        new, reply = self.rule.apply(self.center, x)
        sent = self.pool.send(comm, reply, self.workers[i], Tag.REPLY)
        if self.center is not new:
            self._retire(self.center)  # recycled only once the reply from it has gone
        self.center = new
        self._incoming[i] = self.pool.take()
        self._requests[i] = comm.Irecv(self._incoming[i].numpy(), source=self.workers[i], tag=Tag.EXCHANGE)
        if self.exchanges[i]:
            stale = self.updates - self.last_seen[i]
            self.staleness[i, :2] += (1, stale)
            self.staleness[i, 2] = max(self.staleness[i, 2], stale)
        self.updates += 1
        self.exchanges[i] += 1
        self.last_seen[i] = self.updates
        # The worker is already waiting in its receive (it is inside Sendrecv), so waiting
        # here completes at memory speed however slow the worker computes. Returning to the
        # main wait instead measured 2.4x slower: MPICH moves a large send only inside MPI
        # calls, and Waitany returns at the next arrival, stalling the reply meanwhile.
        # Test in a loop, not Wait: a worker that hung inside its exchange must not hold the
        # server here once the watchdog gives up on it (Waitany on the send and the wake-up
        # call measured 4x slower than this loop).
        self._replying, started = i, time.monotonic()
        while not sent.Test():
            os.sched_yield()
            if self._silent:
                self._drop_silent()
                if self.status[i] == LOST:
                    break
        self._replying = None
        if time.monotonic() - started > self.peer_timeout / 10:  # the others waited on the server
            for j, status in enumerate(self.status):
                if j != i and status == TRAINING:
                    self._expect(j)

    def _serve(self, until: Callable[[], bool], fault) -> None:
        """Handle arrivals until ``until()``; see the module docstring."""
        p = len(self.workers)
        while not until():
            index = MPI.Request.Waitany(self._requests)
            t0 = time.perf_counter()
            group, i = divmod(index, p)
            if group == 3:
                self._wake_up()
                continue
            if group < 2:
                self._expect(i)  # heard from it: restart its clock
            if group == 0:
                self._exchange(i)
                if fault:
                    fault.at_step(self.updates)
            elif group == 1:
                # DONE comes after the worker's last reply arrived: its exchange receive is
                # still posted and will never match, so withdraw it.
                self._requests[i].Cancel()
                self._requests[i].Wait()
                self._retire(self._incoming[i])
                self.status[i] = FINISHED
                if i not in self.barrier.awaiting:
                    self._watchdog.release(self.workers[i])
            else:  # SAVED: its file is on disk, and it waits for us until the checkpoint is complete
                self._watchdog.release(self.workers[i])
                self._requests[index] = self.comm.Irecv(self.epoch[i], source=self.workers[i], tag=Tag.SAVED)
                if self.barrier.saved(i, ok=self.epoch[i, 0] >= 0):
                    self._complete_checkpoint()
            if self._checkpoint_due():
                self._begin_checkpoint()
            self._maybe_snapshot()
            self.busy_seconds += time.perf_counter() - t0

    def run(self) -> None:
        """Serve until every worker is done or lost, then hand the tester the final center
        and write the final checkpoint."""
        comm, p = self.comm, len(self.workers)
        self._incoming = [self.pool.take() for _ in range(p)]
        self._wake = np.zeros(1, dtype=np.int64)
        self._requests = (
            [comm.Irecv(self._incoming[i].numpy(), source=w, tag=Tag.EXCHANGE) for i, w in enumerate(self.workers)]
            + [comm.Irecv(self.done[i], source=w, tag=Tag.DONE) for i, w in enumerate(self.workers)]
            + [comm.Irecv(self.epoch[i], source=w, tag=Tag.SAVED) for i, w in enumerate(self.workers)]
            + [comm.Irecv(self._wake, source=comm.Get_rank(), tag=Tag.WAKE)]
        )
        self._watchdog = Watchdog(comm, self.peer_timeout, lambda w: f"worker rank {w}",
                                  self._on_silent if self.keep_going else None, heard=self._heard,
                                  tick=self._heartbeat).start()
        for i in range(p):
            self._expect(i)
        fault = faults.from_env(comm.Get_rank())
        start = time.perf_counter()
        self._last_snapshot = -float("inf")  # the first update is snapshot at once: the curve's start
        self._serve(lambda: TRAINING not in self.status and self.barrier.phase is Phase.IDLE, fault)
        # The tester never held training up; only the final center waits for it, bounded.
        deadline = time.monotonic() + self.peer_timeout
        if not wait_politely(self._snap_reqs, deadline):
            raise PeerLost(self._tester_lost())
        self._send_snapshot(Kind.FINAL)
        self._final = True
        self._begin_checkpoint()
        self._serve(lambda: self.barrier.phase is Phase.IDLE, fault)
        self._watchdog.stop()
        if not wait_politely(self.pool.requests(), deadline):
            raise PeerLost(self._tester_lost())
        for request in self._requests:  # the SAVED receives still posted
            if request:
                request.Cancel()
                request.Wait()
        if self.center is not self.home:
            self.home.copy_(self.center)
            self.center = self.home
        self.wall_seconds = time.perf_counter() - start

    def state_dict(self) -> dict:
        return {"center": self.center, "updates": self.updates, "exchanges": self.exchanges.tolist(),
                "snapshots": self.snapshots, "last_seen": self.last_seen.tolist(),
                "staleness": self.staleness.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.home.copy_(state["center"])
        self.center = self.home
        self.updates = int(state["updates"])
        self.exchanges[:] = state["exchanges"]
        self.snapshots = int(state.get("snapshots", 0))
        self.last_seen[:] = state.get("last_seen", self.updates)
        if "staleness" in state:
            self.staleness[:] = state["staleness"]
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
            lost_workers=[self.workers[i] for i, s in enumerate(self.status) if s == LOST],
            server_busy_fraction=self.busy_seconds / self.wall_seconds if self.wall_seconds else 0.0,
        )
