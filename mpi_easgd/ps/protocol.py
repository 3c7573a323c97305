"""Message tags, small control-message layouts, and the worker's end of the protocol.

Parameters always travel as raw float32 buffers (or float16/bfloat16 with
``--exchange-dtype``, exchanges only; never pickled), one message each way per
exchange; control messages carry small int64 arrays on their own tags. Two communicators
carry them: the run's own for training traffic (exchanges, DONE, SAVE/SAVED, snapshots),
and a duplicate of it for liveness (heartbeats, DROPPED, the server's wake-up call), the
only traffic that a helper thread sends or tests (see :mod:`.liveness`).
"""

from __future__ import annotations

import time
from collections import deque
from enum import IntEnum

import numpy as np
from mpi4py import MPI


class Tag(IntEnum):
    EXCHANGE = 11  # worker -> server: wire[n] payload (parameters, DOWNPOUR's delta, a pseudo-gradient)
    REPLY = 12  # server -> worker: wire[n] center (wire: float32 unless --exchange-dtype)
    DONE = 13  # worker -> server: int64[DONE_LEN] (exchanges, steps, samples, stopped early)
    SNAPSHOT_META = 14  # server -> tester: int64[META_LEN] (kind, updates, samples, shards taken over: a bitmask)
    SNAPSHOT = 15  # server -> tester: float32[n] center
    CONTROL = 16  # server -> worker: int64[CONTROL_LEN] (Command, checkpoint step); liveness: HEARTBEAT, DROPPED
    SAVED = 17  # worker -> server: int64[SAVED_LEN] (epoch), after its checkpoint file is on disk
    WAKE = 18  # (liveness) server's watchdog thread -> server itself: look at the workers it found silent
    STATS = 19  # every role -> tester, pickled: its statistics for the run summary (a replacement: -> server)
    JOIN = 20  # server -> spare worker, pickled: the run's set-up, then its assignment (or None: not needed)
    START = 21  # server -> replacement worker: float32[n] the center it starts from
    GATHERED = 22  # tester -> server, pickled None: (ULFM) every role's statistics are in
    SHARD = 23  # rank 0 -> shard server: int64[CONTROL_LEN] (ShardCommand, value); shard -> rank 0: its final shard
    WATCH = 24  # never sent: rank 0's receive from a shard server, which completes (in error) when it dies


class Kind(IntEnum):
    """First field of a snapshot's meta message."""

    SNAPSHOT = 1  # evaluate and keep going
    FINAL = 2  # the final center: evaluate, save, summarise, exit


class Command(IntEnum):
    """First field of a control message from the server to a worker (and the tester)."""

    SAVE = 1  # write your checkpoint file for this step, answer SAVED, then wait
    RESUME = 2  # the checkpoint is complete: go on
    END = 3  # the run is over (third field: 1 if it was stopped by a signal)
    DROPPED = 4  # (liveness) --on-worker-loss continue: you were silent too long and no longer count
    HEARTBEAT = 5  # (liveness) the server is alive (sent every second to ranks that may wait on it)


class ShardCommand(IntEnum):
    """What rank 0 tells a shard server (``--servers S``; first field of a control message on
    Tag.SHARD; see :mod:`.shards`)."""

    SNAPSHOT = 1  # send the tester your shard (second field: the snapshot's Kind)
    SAVE = 2  # write your file of checkpoint (second field), answer SAVED
    DROP = 3  # withdraw worker (second field: its index)'s receives: it no longer counts
    END = 4  # training is over: send rank 0 your shard and your counters


DONE_LEN = 4
META_LEN = 4
CONTROL_LEN = 3
SAVED_LEN = 1


class Inbox:
    """A rank's end of one channel of the server's commands: one posted receive, re-armed
    after each message. Heartbeats only update :attr:`last_heard`; other commands queue up
    for :meth:`poll`. Each inbox is used by one thread: the training inbox by the main
    thread, the liveness inbox by the liveness thread (the main thread only reads
    :attr:`dropped`)."""

    def __init__(self, comm: MPI.Comm, server: int) -> None:
        self.comm, self.server = comm, server
        self.dropped = False
        self.last_heard = time.monotonic()
        self._buf = np.zeros(CONTROL_LEN, dtype=np.int64)
        self._queue: deque[tuple[int, int, int]] = deque()
        self._request: MPI.Request | None = self._post()

    def _post(self) -> MPI.Request:
        return self.comm.Irecv(self._buf, source=self.server, tag=Tag.CONTROL)

    def pump(self) -> None:
        """Take in every command that has arrived."""
        while self._request is not None and self._request.Test():
            command = tuple(int(v) for v in self._buf)
            self.last_heard = time.monotonic()
            if command[0] != Command.HEARTBEAT:
                self._queue.append(command)
            self.dropped = self.dropped or command[0] == Command.DROPPED
            last = command[0] in (Command.END, Command.DROPPED)
            self._request = None if last else self._post()

    def poll(self) -> tuple[int, int, int] | None:
        """The next command, or None if none has arrived."""
        self.pump()
        return self._queue.popleft() if self._queue else None

    def ready(self) -> bool:
        """Whether a command is waiting to be polled."""
        self.pump()
        return bool(self._queue)

    def wait(self) -> tuple[int, int, int]:
        """The next command, waiting without spinning."""
        sleep_until(self.ready)
        return self._queue.popleft()

    def settle(self, seconds: float) -> None:
        """Keep taking in commands for ``seconds``: before concluding that the server is
        silent, give messages that have arrived but are not yet matched (after this rank
        was stopped, or starved of CPU) a chance to be."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self.dropped:
            self.pump()
            time.sleep(0.01)

    def heard(self) -> float:
        """When the server last sent anything on this channel (``time.monotonic()``)."""
        self.pump()
        return self.last_heard

    def close(self) -> None:
        """Withdraw the posted receive (a rank that is told nothing more; before its
        channel is disconnected too: MPICH's disconnect waits for every pending receive)."""
        if self._request is not None:
            self._request.Cancel()
            self._request.Wait()
            self._request = None


class WorkerEndpoint:
    """A worker's end of the protocol with the server (see :mod:`.server`): the exchange,
    DONE, SAVED, and two inboxes of the server's commands: :attr:`inbox` (SAVE, RESUME,
    END; main thread) on ``comm``, :attr:`liveness` (heartbeats, DROPPED; the liveness
    thread) on ``live``. ``servers``: every server rank, when the center is split over
    several (``--servers``): an exchange then goes to each, its shard of the message and of
    the reply; everything else only to ``server``. Buffers are whatever mpi4py takes
    (numpy views of the flat buffers); the caller times and watches the calls."""

    def __init__(self, comm: MPI.Comm, live: MPI.Comm, server: int, servers: list[int] | None = None,
                 spares: dict[int, MPI.Comm] | None = None) -> None:
        self.comm, self.server = comm, server
        self.servers = servers or [server]
        self.spares = spares or {}  # (ULFM, --servers) where rank 0 serves a shard whose server died
        self.taken_over: set[int] = set()  # those shards (by server rank)
        self.failed: list[int] = []  # shards (by index) whose last exchange failed: their server died
        self.inbox = Inbox(comm, server)
        self.liveness = Inbox(live, server)

    def exchange(self, buffers: list[tuple[object, object]]) -> None:
        """Send this worker's message (parameters, or DOWNPOUR's update) and receive the
        reply: ``buffers`` holds (message, reply) for each server rank (a shard whose
        server died meanwhile: see :attr:`failed`)."""
        if len(buffers) == 1:
            send, reply = buffers[0]
            self.comm.Sendrecv(send, dest=self.server, sendtag=Tag.EXCHANGE, recvbuf=reply, source=self.server,
                               recvtag=Tag.REPLY)
        else:
            requests = self.start_exchange(buffers)
            while not self.landed(requests, wait=True):
                pass

    def start_exchange(self, buffers: list[tuple[object, object]]) -> list[MPI.Request]:
        """:meth:`exchange` without waiting: the requests of the receives and the sends
        (a pair per shard). Until :meth:`landed`, the messages must not change and the
        replies must not be read."""
        from mpi_easgd.ps.shards import route

        requests = []
        for (send, reply), server in zip(buffers, self.servers):
            comm, rank = route(self.comm, server, self.spares, server in self.taken_over)
            requests += [comm.Irecv(reply, source=rank, tag=Tag.REPLY), comm.Isend(send, dest=rank, tag=Tag.EXCHANGE)]
        self.failed = []
        return requests

    def landed(self, requests: list[MPI.Request], wait: bool = False) -> bool:
        """Whether every shard's exchange of ``requests`` is over (``wait``: waiting for it).
        Under ULFM a shard whose server rank died is over too: it is in :attr:`failed`, and
        its next exchanges go where rank 0 serves it (:mod:`.shards`)."""
        from mpi_easgd.runtime import ft

        for i, server in enumerate(self.servers):
            pair = requests[2 * i:2 * i + 2]
            with ft.survivable() as death:
                if not (MPI.Request.Waitall(pair) if wait else MPI.Request.Testall(pair)):
                    if not wait:
                        return False
            # (Open MPI may also end a wait on a dead peer with nothing received and no error)
            if death or (server in self.spares and server not in self.taken_over and ft.is_dead(self.comm, server)):
                for request in pair:  # (the other one of the pair may still be posted)
                    with ft.survivable():
                        if request:
                            request.Cancel()
                            request.Wait()
                requests[2 * i:2 * i + 2] = [MPI.REQUEST_NULL] * 2
                if server not in self.spares or server in self.taken_over:
                    raise MPI.Exception(MPI.ERR_PROC_FAILED)  # (nothing takes it over: the run ends)
                self.taken_over.add(server)
                self.failed.append(i)
        return True

    def done(self, exchanges: int, steps: int, samples: int, stopped: bool) -> None:
        """Training is over for this worker (after its last exchange): its totals."""
        self.comm.Send(done_message(exchanges, steps, samples, stopped), dest=self.server, tag=Tag.DONE)

    def saved(self, epoch: int) -> None:
        """This worker's checkpoint file is on disk (``epoch`` it is in), or not (-1)."""
        self.comm.Send(np.array([epoch], dtype=np.int64), dest=self.server, tag=Tag.SAVED)

    def command(self) -> tuple[int, int, int]:
        """Wait for the server's next command; DROPPED if the liveness thread learnt that
        the server gave up on this worker."""
        sleep_until(lambda: self.inbox.ready() or self.liveness.dropped)
        return control_tuple(Command.DROPPED) if self.liveness.dropped else self.inbox.poll()


SHARD_ALIGN = 4096  # entries a shard boundary is a multiple of (where the model is large enough)


def shard_bounds(numel: int, shards: int, align: int = SHARD_ALIGN) -> list[tuple[int, int]]:
    """``shards`` contiguous ``[start, stop)`` ranges that cover ``numel`` entries, of
    near-equal size (the last one the shorter), their boundaries multiples of ``align``
    where every shard still gets some."""
    if shards > numel:
        raise ValueError(f"cannot split {numel} parameters over {shards} server ranks")
    step = -(-numel // shards)
    aligned = -(-step // align) * align
    if (shards - 1) * aligned < numel:  # (else the last shard would be empty)
        step = aligned
    return [(min(k * step, numel), min((k + 1) * step, numel)) for k in range(shards)]


def done_message(exchanges: int, steps: int, samples: int, stopped: bool) -> np.ndarray:
    return np.array([exchanges, steps, samples, int(stopped)], dtype=np.int64)


def meta_message(kind: Kind, updates: int, samples: int, taken_over: int = 0) -> np.ndarray:
    return np.array([int(kind), updates, samples, taken_over], dtype=np.int64)


def control_message(command: Command, step: int = 0, flag: int = 0) -> np.ndarray:
    return np.array(control_tuple(command, step, flag), dtype=np.int64)


def control_tuple(command: Command, step: int = 0, flag: int = 0) -> tuple[int, int, int]:
    return int(command), step, flag


def sleep_until(done, deadline: float = float("inf")) -> bool:
    """Call ``done()`` until it is true, sleeping in between with a growing back-off up to
    20 ms (a waiting rank leaves the CPU to ranks that compute), or until the
    ``time.monotonic()`` deadline; True if ``done()`` became true."""
    delay = 1e-4
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return True


def wait_politely(requests: list[MPI.Request], deadline: float = float("inf")) -> bool:
    """Wait for ``requests`` without spinning (see :func:`sleep_until`); True if they completed."""
    return sleep_until(lambda: MPI.Request.Testall(requests), deadline)


def receive_object(comm: MPI.Comm, source: int, tag: int, deadline: float = float("inf")) -> tuple[bool, object]:
    """Receive a pickled message without spinning (see :func:`sleep_until`): ``(True,
    message)``, or ``(False, None)`` if none came by the deadline (the receive is withdrawn)."""
    request, box = comm.irecv(source=source, tag=tag), []

    def arrived() -> bool:
        done, message = request.test()
        if done:
            box.append(message)
        return done

    if sleep_until(arrived, deadline):
        return True, box[0]
    request.Cancel()
    return False, None
