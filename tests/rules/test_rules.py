"""The update rules as pure code: the async family's server and worker rules, overlapped
exchanges, the delayed Nesterov outer step, and synchronous EA's local move (no MPI)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpi_easgd.rules.asynchronous import Arrival, DownpourWorker, ElasticWorker, OuterWorker, server_rule, worker_rule
from mpi_easgd.rules.elastic import ea_local_move


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def test_easgd_exchange_is_the_symmetric_elastic_pull():
    g = torch.Generator().manual_seed(1)
    c, x = torch.randn(100, generator=g), torch.randn(100, generator=g)
    c0, x0 = c.clone(), x.clone()
    incoming = x.clone()
    new, reply = server_rule("easgd", 0.3).apply(c, incoming)
    assert reply is c and torch.equal(c, c0), "the old center is the reply and is never written"
    assert new is incoming, "the new center is written over the incoming message"
    torch.testing.assert_close(new, c0 + 0.3 * (x0 - c0))
    worker = ElasticWorker(x, 0.3)
    worker.reply.copy_(reply)
    worker.absorb()
    torch.testing.assert_close(x, x0 - 0.3 * (x0 - c0))
    torch.testing.assert_close(new - c0, x0 - x)  # what the center gained, the worker gave up


def test_downpour_round_trip():
    c = torch.ones(10)
    x = torch.ones(10)
    worker = DownpourWorker(x)
    x.add_(2.0)  # local updates since the last sync
    worker.prepare()
    assert torch.equal(worker.send, torch.full((10,), 2.0))
    new, reply = server_rule("downpour", 0.5).apply(c, worker.send.clone())
    assert reply is new and torch.equal(new, torch.full((10,), 3.0)) and torch.equal(c, torch.ones(10))
    worker.reply.copy_(reply)
    worker.absorb()
    assert torch.equal(x, new) and torch.equal(worker.anchor, new)


def outer_pushes(rule, center, grads):
    for g in grads:
        center, reply = rule.apply(center, g.clone())
        assert reply is center
    return center


def test_delayed_nesterov_with_delay_1_is_torchs_nesterov_sgd():
    torch.manual_seed(0)
    grads = [torch.randn(6) for _ in range(5)]
    p = nn.Parameter(torch.randn(6))
    start = p.detach().clone()
    opt = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    got = outer_pushes(server_rule("async-diloco", 0.0, 0.7, 0.9, 1), start, grads)
    torch.testing.assert_close(got, p.detach(), rtol=1e-6, atol=1e-6)


def test_delayed_nesterov_moves_by_one_nesterov_step_on_the_mean_every_delay_pushes():
    torch.manual_seed(1)
    rounds = [[torch.randn(4) for _ in range(3)] for _ in range(3)]  # delay 3: three pushes per momentum step
    c = torch.randn(4)
    ref = nn.Parameter(c.clone())
    opt = torch.optim.SGD([ref], lr=0.5, momentum=0.8, nesterov=True)
    rule = server_rule("async-diloco", 0.0, 0.5, 0.8, 3)
    for grads in rounds:
        first = outer_pushes(rule, c, grads[:1])
        torch.testing.assert_close(first, c - 0.5 * grads[0] / 3)  # between milestones: no momentum
        c = outer_pushes(rule, first, grads[1:])
        ref.grad = torch.stack(grads).mean(0)
        opt.step()
        torch.testing.assert_close(c, ref.detach(), rtol=1e-5, atol=1e-6)


def test_delayed_nesterov_state_resumes_exactly():
    torch.manual_seed(2)
    grads = [torch.randn(5) for _ in range(7)]
    whole = outer_pushes(server_rule("async-diloco", 0.0, 0.7, 0.9, 3), torch.zeros(5), grads)
    first = server_rule("async-diloco", 0.0, 0.7, 0.9, 3)
    c = outer_pushes(first, torch.zeros(5), grads[:4])  # stops between two momentum steps
    second = server_rule(**first.params())
    second.load_state_dict(first.state_dict())
    assert torch.equal(outer_pushes(second, c, grads[4:]), whole)


def quorum_pushes(rule, c, pushes):
    """(worker, time) pushes of random pseudo-gradients; returns the center and which pushes
    ended a round (a momentum step)."""
    ends = []
    for i, (worker, when) in enumerate(pushes):
        before = rule.momentum.clone() if rule.momentum is not None else None
        c, _ = rule.exchange(c, torch.full((4,), float(i + 1)), Arrival(worker, 0, i, when))
        ends.append(before is None and bool(rule.momentum.any()) or before is not None
                    and not torch.equal(before, rule.momentum))
    return c, ends


def test_a_quorum_of_distinct_workers_ends_an_outer_round():
    """outer_quorum 2/3 of 3: a round ends at the second distinct worker's push; a fast
    worker's second push does not count twice; the momentum takes the round's mean."""
    rule = server_rule("async-diloco", 0.0, 0.5, 0.8, 3, outer_quorum=2 / 3)
    c, ends = quorum_pushes(rule, torch.zeros(4), [(0, 0.0), (0, 0.1), (1, 0.2), (2, 0.3), (2, 0.35), (0, 0.4)])
    assert ends == [False, False, True, False, False, True]
    assert rule.steps == {"quorum": 2, "grace": 0}
    # the second round's pushes were 4, 5, 6 (values): momentum = 0.8 * mean(1, 2, 3) + mean(4, 5, 6)
    torch.testing.assert_close(rule.momentum, torch.full((4,), 0.8 * 2.0 + 5.0))
    assert c.shape == (4,)


def test_a_round_waiting_on_a_straggler_ends_after_the_grace_window():
    """Intervals of about 1 s between a worker's pushes (median 1, spread 0): a round that
    began more than 1 s before a push ends there, short of its quorum."""
    rule = server_rule("async-diloco", 0.0, 0.5, 0.8, 2, outer_quorum=1.0)  # both workers, or the window
    pushes = [(0, 0.0), (1, 0.5), (0, 1.0), (1, 1.5), (0, 2.0), (0, 3.2), (0, 4.0), (0, 4.5), (1, 5.4)]
    _, ends = quorum_pushes(rule, torch.zeros(4), pushes)
    # rounds: {0,1} at 0.5; {0,1} at 1.5; then worker 1 is late: 2.0 opens a round, 3.2 is past 1 s + 0
    assert ends == [False, True, False, True, False, True, False, False, True]
    assert rule.steps == {"quorum": 3, "grace": 1}
    again = server_rule(**rule.params())  # resumes with the same counts and intervals
    again.load_state_dict(rule.state_dict())
    assert again.steps == rule.steps and again.intervals == rule.intervals and again.round == rule.round


def test_outer_worker_sends_its_pseudo_gradient_and_restarts_from_the_center():
    x = torch.ones(3)
    worker = OuterWorker(x)
    x.sub_(0.25)  # local steps
    worker.prepare()
    assert torch.equal(worker.send, torch.full((3,), 0.25))  # start - x
    worker.reply.fill_(2.0)
    worker.absorb()
    assert torch.equal(x, torch.full((3,), 2.0)) and torch.equal(worker.anchor, x)


@pytest.mark.parametrize("algo", ["easgd", "downpour", "async-diloco"])
def test_overlapped_exchange_moves_by_what_was_sent_and_keeps_the_steps_taken_meanwhile(algo):
    """--overlap-exchange: the message is a snapshot of x at the send; steps taken while it
    and the reply are in flight stay; the move is computed from the snapshot."""
    g = torch.Generator().manual_seed(3)
    x0, c0, steps = (torch.randn(50, generator=g) for _ in range(3))
    x = x0.clone()
    rule = worker_rule(algo, x, 0.3, overlap=True)
    anchor = x0.clone()  # downpour / async-diloco start from where they last synchronised
    rule.prepare()
    message = rule.send.clone()
    x.add_(steps)  # local steps while the message travels: the message must not change
    assert torch.equal(rule.send, message), "the message is a snapshot, not the live parameters"
    new, reply = server_rule(algo, 0.3, outer_delay=1).apply(c0.clone(), rule.send.clone())
    rule.reply.copy_(reply)
    rule.absorb()
    if algo == "easgd":
        torch.testing.assert_close(message, x0, rtol=0, atol=0)
        torch.testing.assert_close(x, x0 + steps - 0.3 * (x0 - c0))
        torch.testing.assert_close((x - (x0 + steps)) + (new - c0), torch.zeros(50), atol=1e-6, rtol=0)
    else:
        torch.testing.assert_close(message, x0 - anchor if algo == "downpour" else anchor - x0)
        torch.testing.assert_close(x, new + steps)  # restarted from the new center, the steps kept
        assert torch.equal(rule.anchor, new)


@pytest.mark.parametrize("algo", ["easgd", "downpour", "async-diloco"])
def test_overlapped_exchange_with_no_step_in_flight_is_the_blocking_one(algo):
    g = torch.Generator().manual_seed(4)
    x0, c0 = torch.randn(50, generator=g), torch.randn(50, generator=g)
    results = []
    for overlap in (False, True):
        x = x0.clone()
        rule = worker_rule(algo, x, 0.3, overlap=overlap)
        x.add_(0.5)  # steps since the last exchange
        rule.prepare()
        rule.reply.copy_(server_rule(algo, 0.3, outer_delay=1).apply(c0.clone(), rule.send.clone())[1])
        rule.absorb()
        results.append(x)
    torch.testing.assert_close(results[1], results[0])


def test_ea_local_move():
    x, c, d = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]), torch.empty(2)
    ea_local_move(x, c, 0.25, d)
    assert torch.equal(d, torch.tensor([0.25, 0.5])) and torch.equal(x, torch.tensor([0.75, 1.5]))


@pytest.mark.parametrize("algo", ["easgd", "downpour", "async-diloco"])
def test_max_staleness_damps_a_stale_exchange_by_k_over_its_staleness(algo):
    """A state message (easgd's x): the center's move is scaled; an increment (downpour's
    update, async-diloco's pseudo-gradient): the message is, before the rule (and its
    momentum) take it. Within K, or without K, the rule applies as it is."""
    torch.manual_seed(0)
    center, x = torch.randn(50), torch.randn(50)
    fresh = server_rule(algo, 0.3, outer_delay=1)
    bounded = server_rule(algo, 0.3, outer_delay=1, max_staleness=2)
    for stale in (0, 2):  # within K: the same bits
        a, b = fresh.exchange(center, x.clone(), Arrival(0, stale, 5)), bounded.exchange(center, x.clone(),
                                                                                          Arrival(0, stale, 5))
        assert torch.equal(a[0], b[0]) and bounded.damps(Arrival(0, stale, 5)) == 1.0
    fresh, bounded = server_rule(algo, 0.3, outer_delay=1), server_rule(algo, 0.3, outer_delay=1, max_staleness=2)
    assert bounded.damps(Arrival(0, 8, 5)) == 0.25
    whole = fresh.exchange(center, x.clone(), Arrival(0, 8, 5))[0] - center
    damped = bounded.exchange(center, x.clone(), Arrival(0, 8, 5))[0] - center
    torch.testing.assert_close(damped, 0.25 * whole, rtol=1e-5, atol=1e-6)
    assert bounded.params()["max_staleness"] == 2, "the audit's replay rebuilds the damping"


def test_a_worker_side_that_does_not_say_what_it_sends_is_taken_for_a_state():
    """A user's worker side need not subclass WorkerRule: without ``message``, damping
    (and a compressed exchange) treat its message as a state, never fail on it."""
    from mpi_easgd.rules.asynchronous import ServerRule, message_kind

    class Worker:  # build / prepare / absorb would be here
        pass

    class Pull(ServerRule):
        worker_rule = Worker

        def apply(self, center, incoming, arrival=None):
            return torch.lerp(center, incoming, 0.5, out=incoming), center

    assert message_kind(Worker) == "state"
    rule = Pull("pull", max_staleness=1)
    center, x = torch.zeros(4), torch.ones(4)
    new, _ = rule.exchange(center, x.clone(), Arrival(0, 4, 9))
    assert torch.equal(new, torch.full((4,), 0.125)), "the center's move (0.5) damped by 1/4"
