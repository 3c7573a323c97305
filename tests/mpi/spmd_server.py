"""The real parameter server against scripted workers and a scripted tester, in one job.

Run under ``mpiexec -n 4 python -m mpi4py -m pytest tests/mpi/spmd_server.py``: rank 0 runs
:class:`Server`, ranks 1 and 2 script a worker's messages through :class:`WorkerEndpoint`
(exchange, DONE, SAVED, the command inbox), rank 3 takes snapshots as the tester does.
Each test checks one protocol path in seconds, without training: exchanges then DONE ->
END, a periodic checkpoint SAVE -> SAVED -> RESUME, a silent worker -> DROPPED (on the
liveness channel, with heartbeats), that no snapshot follows the final center, and that a
slow worker does not hold the others to its pace; and the server benchmark's smoke run.
"""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from comm import one_side_fails_all  # tests/mpi: on sys.path, as the test file's folder
from mpi4py import MPI

from mpi_easgd.flat import flat_buffer
from mpi_easgd.ps.policies import Continue
from mpi_easgd.ps.protocol import META_LEN, Command, Kind, Tag, WorkerEndpoint
from mpi_easgd.ps.server import Server
from mpi_easgd.rules.asynchronous import server_rule

WORLD = MPI.COMM_WORLD
RANK = WORLD.Get_rank()
N, WORKERS, TESTER = 16, [1, 2], 3
pytestmark = pytest.mark.skipif(WORLD.Get_size() != 4, reason="server, 2 workers, tester: 4 ranks")


class Comms:
    """A communicator of its own per test and its liveness duplicate: nothing one test
    leaves unread reaches the next."""

    def __init__(self) -> None:
        self.comm = WORLD.Dup()
        self.live = self.comm.Dup()

    def __getattr__(self, name):
        return getattr(self.comm, name)


@pytest.fixture
def comm():
    comms = Comms()
    yield comms
    comms.Barrier()


def serve(comm, saves: list, **options) -> Server:
    center = flat_buffer(N)
    center.copy_(torch.arange(N, dtype=torch.float32))

    def save(step: int, extra: dict, written: bool) -> Path:
        saves.append((step, extra, written))
        return Path(f"step-{step}")

    server = Server(comm.comm, comm.live, center, server_rule("easgd", 0.25), WORKERS, TESTER,
                    samples_per_exchange=1, save=save, **{"test_every": 1e9, **options})
    server.run()
    return server


def take_snapshots(comm, quiet_after: float = 0.0) -> list[int]:
    """The tester's side: every snapshot's kind until the final center; then, for
    ``quiet_after`` seconds, check that nothing more comes."""
    meta, center, kinds = np.zeros(META_LEN, np.int64), np.zeros(N, np.float32), []
    while not kinds or kinds[-1] != Kind.FINAL:
        comm.Recv(meta, source=0, tag=Tag.SNAPSHOT_META)
        comm.Recv(center, source=0, tag=Tag.SNAPSHOT)
        kinds.append(int(meta[0]))
    end = time.monotonic() + quiet_after
    while time.monotonic() < end:
        assert not comm.Iprobe(source=0, tag=Tag.SNAPSHOT_META), "a snapshot after the final center"
        time.sleep(0.01)
    return kinds


def exchange(endpoint, times: int, pause: float = 0.0) -> None:
    x, reply = np.full(N, float(RANK), np.float32), np.zeros(N, np.float32)
    for _ in range(times):
        endpoint.exchange([(x, reply)])
        time.sleep(pause)


def finish(endpoint) -> None:
    """After DONE: take part in checkpoints (periodic ones may come before the final) until END."""
    while (command := endpoint.inbox.wait()[0]) != Command.END:
        assert command in (Command.SAVE, Command.RESUME), command
        if command == Command.SAVE:
            endpoint.saved(1)


def answer(endpoint, *expected: Command) -> list[tuple[int, int, int]]:
    """Receive the expected commands in order, answering each SAVE with SAVED."""
    got = []
    for want in expected:
        command = endpoint.inbox.wait()
        assert command[0] == want, (command, want)
        got.append(command)
        if want == Command.SAVE:
            endpoint.saved(1)
    return got


@one_side_fails_all
def test_exchanges_then_done_end_with_the_final_checkpoint(comm):
    if RANK == 0:
        saves = []
        server = serve(comm, saves, audit=True)
        assert server.updates == 6 and [r.exchanges for r in server.roster] == [3, 3]
        center = server.audit.initial[0].clone()
        for _, x in server.audit.exchanges:  # the log replays to the center, bit for bit
            center, _ = server_rule("easgd", 0.25).apply(center, x.clone())
        assert torch.equal(center, server.center)
        assert [(step, written, extra["finished"]) for step, extra, written in saves] == [(6, True, True)]
    elif RANK in WORKERS:
        endpoint = WorkerEndpoint(comm.comm, comm.live, 0)
        exchange(endpoint, 3)
        endpoint.done(3, 3, 3, False)
        (save, end) = answer(endpoint, Command.SAVE, Command.END)
        assert save[1] == 6 and end[2] == 0  # the final checkpoint's step; not stopped by a signal
    else:
        assert take_snapshots(comm) == [Kind.SNAPSHOT, Kind.FINAL]  # the first update, then the final


@one_side_fails_all
def test_periodic_checkpoint_pauses_every_worker_then_resumes(comm):
    if RANK == 0:
        saves = []
        serve(comm, saves, checkpoint_every="2")
        steps = [(step, written, extra["finished"]) for step, extra, written in saves]
        assert steps[0] == (2, True, False) and steps[-1] == (4, True, True), steps
    elif RANK in WORKERS:
        endpoint = WorkerEndpoint(comm.comm, comm.live, 0)
        exchange(endpoint, 1)
        save, _ = answer(endpoint, Command.SAVE, Command.RESUME)  # no exchange is served in between
        assert save[1] == 2
        exchange(endpoint, 1)
        endpoint.done(2, 2, 2, False)
        finish(endpoint)
    else:
        take_snapshots(comm)


@one_side_fails_all
def test_a_silent_worker_is_dropped_and_told_so(comm):
    if RANK == 0:
        saves = []
        server = serve(comm, saves, peer_timeout=1.0, policy=Continue())
        assert server.stats().lost_workers == [2]
        step, extra, written = saves[-1]
        assert extra["lost_ranks"] == [2] and not extra["finished"] and written
    elif RANK == 1:
        endpoint = WorkerEndpoint(comm.comm, comm.live, 0)
        exchange(endpoint, 6, pause=0.4)  # heard from every 0.4 s, for longer than the timeout
        endpoint.done(6, 6, 6, False)
        answer(endpoint, Command.SAVE, Command.END)
    elif RANK == 2:  # says nothing: hung, as far as the server can tell
        endpoint = WorkerEndpoint(comm.comm, comm.live, 0)
        started = time.monotonic()
        assert endpoint.liveness.wait()[0] == Command.DROPPED  # on the liveness channel
        assert 1.0 <= time.monotonic() - started < 5.0
        assert time.monotonic() - endpoint.liveness.last_heard < 0.1  # heartbeats came while it waited
    else:
        take_snapshots(comm)


@one_side_fails_all
def test_no_snapshot_follows_the_final_center(comm):
    """With snapshots due all the time, none may be sent after the final center, during the
    final checkpoint: the tester would never take it and the server would wait for it."""
    if RANK == 0:
        serve(comm, [], test_every=0.0001, checkpoint_every="3")
    elif RANK in WORKERS:
        endpoint = WorkerEndpoint(comm.comm, comm.live, 0)
        exchange(endpoint, 4, pause=0.01)
        endpoint.done(4, 4, 4, False)
        finish(endpoint)
    else:
        kinds = take_snapshots(comm, quiet_after=0.5)
        assert kinds.count(Kind.FINAL) == 1 and len(kinds) > 2


@one_side_fails_all
def test_a_slow_worker_does_not_stall_the_others(comm):
    """Worker 1 exchanges at most 10 times a second; worker 2, meanwhile, far faster: a
    server that served its workers in turn would hold it to worker 1's pace."""
    if RANK == 0:
        serve(comm, [])
    elif RANK in WORKERS:
        endpoint = WorkerEndpoint(comm.comm, comm.live, 0)
        times, pause = (5, 0.1) if RANK == 1 else (200, 0.0)
        started = time.perf_counter()
        exchange(endpoint, times, pause)
        if RANK == 2:
            rate = times / (time.perf_counter() - started)
            assert rate > 4 * (1 / 0.1), f"{rate:.0f} exchanges/s"
        endpoint.done(times, times, times, False)
        finish(endpoint)
    else:
        take_snapshots(comm)


@one_side_fails_all
def test_the_server_benchmark_runs(capsys, monkeypatch):
    """``benchmarks/server_throughput.py`` as documented (it drives this server through
    WorkerEndpoint), at a tiny size: in this job rather than a launch of its own."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "server_throughput.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--sizes", "1e5", "--pairs", "1", "--exchanges", "5"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert RANK or ("100,000" in out and "ratio" in out), out
    # the center over ranks 0 and 1 ("ours2"), one worker (rank 2)
    monkeypatch.setattr(sys, "argv", [str(script), "--sizes", "1e5", "--pairs", "1", "--exchanges", "5",
                                      "--servers", "2"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert RANK or ("ours2/ours" in out and "1 workers" in out), out
