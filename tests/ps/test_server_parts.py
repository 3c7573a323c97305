"""The parameter server's parts in this process, on ``MPI.COMM_SELF`` (this rank plays the
worker too, by sending to itself): endpoints, liveness, center versions, and the
checkpoint barrier as a pure state machine."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpi_easgd import compress
from mpi_easgd.flat import flat_buffer
from mpi_easgd.ps.center import CenterVersions
from mpi_easgd.ps.endpoints import Endpoints, Kind
from mpi_easgd.ps.liveness import ServerLiveness
from mpi_easgd.ps.protocol import Command, Inbox, Tag, shard_bounds
from mpi_easgd.ps.roster import Roster
from mpi_easgd.ps.wire import ServerChannel, WorkerWire
from mpi_easgd.rules.asynchronous import server_rule, worker_rule
from mpi_easgd.transfer import mpi_view

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
    reply = versions.apply(versions.arrived(x))
    assert versions.current.dtype == torch.float32 and reply.dtype == torch.float16
    assert torch.equal(versions.current, torch.full((3,), 1.0 / 3).half().float()), "the message as it travelled"
    request = versions.send(SELF, reply, 0, 7)
    assert versions.take() is not reply, "not reused while its send is in flight"
    got = torch.zeros(3, dtype=torch.float16)
    SELF.Recv(got.view(torch.int16).numpy(), source=0, tag=7)
    request.Wait()
    assert torch.equal(got, versions.current.half())
    assert any(versions.take() is b for b in (reply, x)), "wire buffers are recycled"


@pytest.mark.parametrize("shards", [1, 2], ids=["one-server", "two-shards"])
@pytest.mark.parametrize("algo", ["easgd", "downpour"])
@pytest.mark.parametrize("fmt", ["int8", "int4", "topk"])
def test_a_compressed_exchange_agrees_at_both_ends(algo, fmt, shards):
    """Worker and server ends of a compressed exchange over MPI (to this process): the
    server applies exactly what the worker's end says it sent, and the worker gets exactly
    the reply the server's channel holds, exchange after exchange; the bytes are the codec's.
    With two shards (--servers 2) each travels on its own, to its own server's channel."""
    n = 3000
    codec = compress.codec(fmt)
    center = flat_buffer(n)
    center.copy_(torch.randn(n))
    x = center.clone()
    rule = server_rule(algo, 0.5)
    bounds = shard_bounds(n, shards)
    assert bounds[-1][1] == n and all(b > a for a, b in bounds)
    servers = [(CenterVersions(center[a:b], rule, codec),
                ServerChannel(codec, center[a:b], rule.worker_rule.message == "state", torch.empty(b - a)))
               for a, b in bounds]
    worker = worker_rule(algo, x, 0.5)
    wire = WorkerWire(worker, codec, "auto", x, bounds)
    assert wire.bytes_each_way == (sum(codec.nbytes(b - a) for a, b in bounds),) * 2
    meant, applied_sum = torch.zeros(n), torch.zeros(n)
    for _ in range(5):
        x.add_(0.01 * torch.randn(n))  # local steps
        worker.prepare()
        applied = torch.cat([a.float() for a in wire.before_send()])
        meant += worker.send
        applied_sum += applied
        for (a, b), (versions, channel), (message, reply_buf) in zip(bounds, servers, wire.buffers):
            buf = versions.take()
            SELF.Sendrecv(message, 0, 3, mpi_view(buf), 0, 3)
            got = versions.arrived(buf, channel)
            assert torch.equal(got, applied[a:b]), "the server applies what the worker's end says it sent"
            reply = versions.apply(got, None, channel)
            assert reply.dtype == torch.uint8 and reply.numel() == codec.nbytes(b - a)
            request = versions.send(SELF, reply, 0, 4)
            SELF.Recv(reply_buf, source=0, tag=4)
            request.Wait()
        wire.after_recv()
        reference = torch.cat([channel.down.reference for _, channel in servers])
        assert torch.equal(worker.reply, reference), "both ends hold the same reference"
        worker.absorb()
    if algo == "downpour":  # increments: what arrived and what the residual still owes add up to what was meant
        torch.testing.assert_close(applied_sum + wire.state_dict()["residual"], meant, atol=1e-5, rtol=0)


def test_checkpoint_barrier_completes_when_every_member_answered_or_was_lost():
    from mpi_easgd.ps.barrier import CheckpointBarrier, Phase

    b = CheckpointBarrier()
    assert b.begin(40, {0, 1, 2}) == {0, 1, 2} and b.phase is Phase.SAVING
    with pytest.raises(RuntimeError, match="already in progress"):
        b.begin(41, {0})
    assert not b.saved(0, ok=True) and not b.lost(2)
    with pytest.raises(RuntimeError, match="not complete"):
        b.finish()
    assert b.saved(1, ok=True)
    step, written, _ = b.finish()
    assert (step, written, b.phase) == (40, True, Phase.IDLE)
    b.begin(80, {0, 1})  # a failed write makes the checkpoint incomplete
    b.saved(0, ok=False)
    assert b.saved(1, ok=True) and b.finish()[:2] == (80, False)
    b.begin(90, set())  # nobody left to ask: complete at once
    assert b.complete
    with pytest.raises(RuntimeError, match="no checkpoint it was asked for"):
        CheckpointBarrier().saved(3, ok=True)
