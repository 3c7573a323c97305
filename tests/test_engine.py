"""The training loop and the async engine's parts, in this process: the loop with a
recording algorithm, and the server's endpoints, liveness and center versions on
``MPI.COMM_SELF`` (this rank plays the worker too, by sending to itself); and that a sync
checkpoint of the earlier layout still resumes."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from mpi_easgd.config import Config
from mpi_easgd.flat import FlatParameters, flat_buffer
from mpi_easgd.ps.center import CenterVersions
from mpi_easgd.ps.endpoints import Endpoints, Kind
from mpi_easgd.ps.liveness import ServerLiveness
from mpi_easgd.ps.protocol import Command, Inbox, Tag
from mpi_easgd.ps.roster import Roster
from mpi_easgd.rules.asynchronous import server_rule
from mpi_easgd.runtime.loop import Action, NonFiniteError, Position, train
from mpi_easgd.runtime.metrics import NullRunLog


class Batches:
    """``steps`` batches per epoch of a 4-feature, 3-class problem; NaN images at ``nan``."""

    def __init__(self, nan: set[int] = frozenset()) -> None:
        self.nan, self.served = nan, 0

    def epoch(self, epoch: int, start: int = 0):
        for i in range(start, 5):
            x = torch.full((2, 4), float("nan")) if (epoch, i) in self.nan else torch.randn(2, 4)
            self.served += 1
            yield x, torch.tensor([0, 2])


class Recorder:
    """An algorithm that records what the loop asks of it and answers ``actions``."""

    def __init__(self, actions: dict[tuple[int, int], Action] | None = None) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(4, 3)
        self.flat = FlatParameters(self.model)
        self.actions = actions or {}
        self.calls: list[tuple] = []

    def step(self, pos, has_grad):
        self.calls.append(("step", pos.epoch, pos.step, has_grad))

    def boundary(self, pos):
        return self.actions.get((pos.epoch, pos.step), Action.NONE)

    def save(self, pos):
        self.calls.append(("save", pos.epoch, pos.step, pos.stats.batches))

    def end_epoch(self, pos):
        self.calls.append(("end", pos.epoch, pos.stats.batches, pos.stats.samples))

    def state_dict(self, pos):
        return {}


def run(algo, pos=None, epochs=2, batches=None, **cfg):
    pos = pos or Position()
    stopped = train(algo, batches or Batches(), pos, Config(epochs=epochs, **cfg), steps=5, rank=0,
                    device=torch.device("cpu"), log=NullRunLog())
    return stopped, pos


def test_the_loop_steps_saves_and_ends_epochs_in_order():
    algo = Recorder({(0, 3): Action.SAVE})
    stopped, pos = run(algo)
    assert not stopped and (pos.epoch, pos.step, pos.t, pos.samples) == (2, 0, 10, 20)
    assert algo.calls[:5] == [("step", 0, i, True) for i in range(3)] + [("save", 0, 3, 3), ("step", 0, 3, True)]
    assert ("end", 0, 5, 10) in algo.calls and algo.calls[-1] == ("end", 1, 5, 10)


def test_stop_is_a_returned_value_after_the_checkpoint_and_resumes_mid_epoch():
    algo = Recorder({(1, 2): Action.SAVE | Action.STOP})
    stopped, pos = run(algo)
    assert stopped and algo.calls[-1] == ("save", 1, 2, 2) and (pos.epoch, pos.step, pos.t) == (1, 2, 7)
    resumed = Position.from_state(pos.state_dict())  # as a checkpoint carries it
    again = Recorder()
    stopped, end = run(again, resumed)
    assert not stopped and again.calls[0] == ("step", 1, 2, True) and end.t == 10
    assert again.calls[-1] == ("end", 1, 5, 10), "the resumed epoch counts the batches before the stop"


def test_a_nonfinite_step_is_skipped_or_stops_the_run():
    algo = Recorder()
    _, pos = run(algo, batches=Batches(nan={(0, 1)}))
    assert pos.skipped == 1 and ("step", 0, 1, False) in algo.calls  # still steps (keeps collectives matched)
    assert ("end", 0, 4, 8) in algo.calls, "the skipped batch counts in no loss"
    with pytest.raises(NonFiniteError, match="non-finite loss or gradient on rank 0"):
        run(Recorder(), batches=Batches(nan={(0, 1)}), on_nonfinite="stop")


def test_a_rank_out_of_data_steps_without_a_batch():
    class Short(Batches):
        def epoch(self, epoch, start=0):
            yield from list(super().epoch(epoch, start))[:3]

    algo = Recorder()
    _, pos = run(algo, epochs=1, batches=Short())
    assert [c[3] for c in algo.calls if c[0] == "step"] == [True] * 3 + [False] * 2 and pos.samples == 6


def test_injected_faults_apply_once_in_the_loop(monkeypatch):
    from mpi_easgd.runtime.faults import InjectedFault

    monkeypatch.setenv("MPI_EASGD_FAULT", "rank=0,action=raise,step=7")
    algo = Recorder()
    with pytest.raises(InjectedFault):
        run(algo)
    assert sum(c[0] == "step" for c in algo.calls) == 7


def test_positions_from_older_or_partial_states():
    rejoin = Position.from_state({"epoch": 2, "exchanges": 9})  # a worker lost in the saved run
    assert (rejoin.epoch, rejoin.step, rejoin.t) == (2, 0, 0)


# ---- the server's parts on COMM_SELF ------------------------------------------------

SELF = MPI.COMM_SELF


def test_endpoints_yield_typed_events_and_withdraw():
    comm, live = SELF.Dup(), SELF.Dup()
    wake = np.zeros(1, np.int64)
    endpoints = Endpoints(Roster(comm, live, [0]), lambda: flat_buffer(4),
                          lambda: live.Irecv(wake, source=0, tag=Tag.WAKE))
    comm.Send(np.arange(4, dtype=np.float32), dest=0, tag=Tag.EXCHANGE)
    kind, worker, buf = endpoints.wait()
    assert (kind, worker) == (Kind.EXCHANGE, 0) and buf.tolist() == [0, 1, 2, 3]
    endpoints.post_exchange(0, flat_buffer(4))
    for epoch in (3, 4):  # SAVED is re-armed: a worker may be asked again
        comm.Send(np.array([epoch], np.int64), dest=0, tag=Tag.SAVED)
        assert endpoints.wait() == (Kind.SAVED, 0, epoch)
    live.Send(np.zeros(1, np.int64), dest=0, tag=Tag.WAKE)
    assert endpoints.wait()[0] is Kind.WAKE
    comm.Send(np.array([5, 6, 7, 0], np.int64), dest=0, tag=Tag.DONE)
    kind, _, totals = endpoints.wait()
    assert kind is Kind.DONE and totals.tolist() == [5, 6, 7, 0]
    assert endpoints.withdraw(0) is not None, "the posted exchange buffer comes back"
    assert endpoints.withdraw(0) is None
    endpoints.close()
    comm.Free(), live.Free()


def test_liveness_reports_a_silent_worker_once_and_sends_heartbeats():
    comm, live = SELF.Dup(), SELF.Dup()
    liveness = ServerLiveness(comm, live, Roster(comm, live, [0]), timeout=0.3, keep_going=True)
    wake = liveness.wake_receive()
    beats = Inbox(live, 0)  # this rank is also the worker that gets the heartbeats
    liveness.start()
    assert not liveness.pending and not wake.Test()
    deadline = time.monotonic() + 5
    while not wake.Test() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert liveness.pending
    (worker, seconds), = liveness.lost()
    assert worker == 0 and seconds > 0.3 and liveness.lost() == []
    liveness.dropped(0)
    assert beats.wait()[0] == Command.DROPPED and beats.dropped, "told, on the liveness channel"
    liveness.stop()
    comm.Free(), live.Free()


def test_center_versions_are_never_written_while_a_send_may_read_them():
    center = flat_buffer(3)
    versions = CenterVersions(center, server_rule("easgd", 0.5))
    x = versions.take()
    x.fill_(2.0)
    reply = versions.apply(x)
    assert reply is center and versions.current is x and center.tolist() == [0, 0, 0]  # EASGD: old center
    assert x.tolist() == [1, 1, 1]
    request = versions.send(SELF, versions.current, 0, 7)
    y = versions.take()
    y.fill_(3.0)
    versions.apply(y)  # x is retired, but a send from it is still in flight
    assert versions.take() is not x
    SELF.Recv(np.zeros(3, np.float32), source=0, tag=7)
    request.Wait()
    assert versions.take() is x, "reused once its send completed"
    versions.settle()
    assert versions.current is center and center.tolist() == [2, 2, 2]


def test_center_versions_with_a_16_bit_wire_keep_a_float32_center():
    center = flat_buffer(3)
    versions = CenterVersions(center, server_rule("downpour", 0.5), torch.float16)
    x = versions.take()
    assert x.dtype == torch.float16
    x.fill_(1.0 / 3)  # not a float16 number: rounded on the wire
    reply = versions.apply(x)
    assert versions.current.dtype == torch.float32 and reply.dtype == torch.float16
    assert torch.equal(versions.current, torch.full((3,), 1.0 / 3).half().float()), "the message as it travelled"
    request = versions.send(SELF, reply, 0, 7)
    assert versions.take() is not reply, "not reused while its send is in flight"
    got = torch.zeros(3, dtype=torch.float16)
    SELF.Recv(got.view(torch.int16).numpy(), source=0, tag=7)
    request.Wait()
    assert torch.equal(got, versions.current.half())
    assert any(versions.take() is b for b in (reply, x)), "wire buffers are recycled"


def test_a_sync_checkpoint_of_the_earlier_layout_still_resumes(blobs, tmp_path):
    """Checkpoints written before the one loop kept the position's fields (epoch, step,
    stats, skipped) at the top level of each rank's file; they must resume the same."""
    from mpi_easgd.collectives.peer import Peer
    from mpi_easgd.data import read_info
    from mpi_easgd.runtime.context import RunContext
    from mpi_easgd.runtime.control import StopRequest
    from mpi_easgd.runtime.loop import EpochStats
    from mpi_easgd.topology import Topology

    cfg = Config(algo="sgd", model="mlp", dataset=str(blobs)).resolve(1)
    ctx = RunContext(cfg, SELF, Topology.build(1, 0, "sgd"), read_info(blobs), torch.device("cpu"), NullRunLog(),
                     tmp_path, StopRequest(), None)
    pos = Position(epoch=1, step=4, t=20, skipped=2, stats=EpochStats(loss_sum=1.5, batches=4, samples=64))
    state = Peer(ctx, steps=16).state_dict(pos)
    old = {k: v for k, v in state.items() if k != "position"}
    old.update(epoch=1, step=4, stats=vars(pos.stats), skipped=2)
    resumed = Peer(ctx, steps=16).load_state_dict(old)
    assert (resumed.epoch, resumed.step, resumed.skipped, resumed.stats) == (1, 4, 2, pos.stats)
