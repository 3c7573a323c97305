"""Flat buffers, update rules, config and topology: the pure parts (no MPI traffic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mpi_easgd.config import Config, ConfigError, parse_args
from mpi_easgd.flat import FlatParameters
from mpi_easgd.models import ModelError, build_model, check_model_name
from mpi_easgd.rules.asynchronous import DownpourWorker, ElasticWorker, OuterWorker, server_rule, worker_rule
from mpi_easgd.rules.elastic import ea_local_move
from mpi_easgd.topology import Topology
from mpi_easgd.transfer import MPIBuffer


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def test_flat_parameters_are_views_and_training_is_unchanged():
    ref, model = small_model(), small_model()
    flat = FlatParameters(model)
    assert flat.numel == sum(p.numel() for p in ref.parameters())
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        for m, o in ((ref, opt_ref), (model, opt)):
            o.zero_grad()  # set_to_none: the flat module must cope via gather_grads
            nn.functional.cross_entropy(m(x), y).backward()
        flat.gather_grads()
        opt_ref.step()
        opt.step()
    for p, q in zip(ref.parameters(), model.parameters()):
        assert torch.equal(p, q)
    offset = 0
    for p in model.parameters():
        assert p.data_ptr() == flat.data[offset:].data_ptr()
        assert p.grad.data_ptr() == flat.grad[offset:].data_ptr()
        offset += p.numel()
    flat.check_views()


def test_backward_accumulates_into_the_flat_gradient_in_place():
    model = small_model()
    flat = FlatParameters(model, grad_extra=1)
    flat.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(4, 5)), torch.tensor([0, 1, 2, 0])).backward()
    assert flat.grad.abs().sum() > 0
    assert all(p.grad.data_ptr() >= flat.grad_buffer.data_ptr() for p in model.parameters())
    assert flat.grad_buffer.numel() == flat.numel + 1


def test_moving_the_model_after_flattening_is_detected():
    model = small_model()
    flat = FlatParameters(model)
    model[0].weight.data = model[0].weight.data.clone()
    with pytest.raises(RuntimeError, match="no longer lives in the flat buffer"):
        flat.check_views()


def test_mpi_buffer_refuses_non_contiguous():
    with pytest.raises(ValueError, match="contiguous"):
        MPIBuffer(torch.zeros(3, 4).t())
    t = torch.arange(4.0)
    buf = MPIBuffer(t)
    buf.mpi[0] = 7
    assert t[0] == 7  # a zero-copy view on CPU


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


def test_config_precedence_and_types(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('algo = "sgd"\nlr = 1\nepochs = 3\n')
    cfg = parse_args(["--config", str(toml), "--epochs", "4"])
    assert (cfg.algo, cfg.lr, cfg.epochs) == ("sgd", 1.0, 4)
    assert isinstance(cfg.lr, float)
    assert parse_args(["--no-progress"]).progress is False


@pytest.mark.parametrize("text,match", [
    ("colour = 1", "unknown config key 'colour'"),
    ('epochs = "ten"', "--epochs in .* must be int; got str"),
    ("tau = true", "--tau in .* must be int; got bool"),
    ("tau = 0", "--tau must be an integer >= 1"),
    ("alpha = 1.5", r"--alpha must be in \(0, 1\)"),
    ("lr = -1", "--lr must be > 0"),
    ("epochs = [", "not valid TOML"),
    ('on_worker_loss = "maybe"', "--on-worker-loss must be one of abort, continue, respawn; got 'maybe'"),
    ('algo = "sgd"\non_worker_loss = "continue"', "--on-worker-loss continue needs an asynchronous algorithm"),
    ('checkpoint_every = "5d"', "--checkpoint-every must be a number of steps"),
    ('algo = "ea"\noverlap_exchange = true', "--overlap-exchange needs an asynchronous algorithm"),
])
def test_bad_config_values(tmp_path, text, match):
    toml = tmp_path / "bad.toml"
    toml.write_text(text + "\n")
    with pytest.raises(ConfigError, match=match):
        parse_args(["--config", str(toml)])


def test_bad_flags_raise_config_errors():
    with pytest.raises(ConfigError, match="invalid choice"):
        parse_args(["--algo", "adam"])
    with pytest.raises(ConfigError, match="unrecognized arguments"):
        parse_args(["--colour", "red"])
    with pytest.raises(ConfigError, match="not found"):
        parse_args(["--config", "/nonexistent.toml"])


def test_resolve_defaults_and_beta_warning():
    cfg = Config(algo="easgd").resolve(workers=3)
    assert cfg.alpha == pytest.approx(0.3) and cfg.momentum == 0.0
    assert Config(algo="eamsgd").resolve(2).momentum == 0.9
    notes = Config(algo="ea", alpha=0.4).resolve(workers=3).advice(3, 1000, (3, 32, 32), "cifar10")
    assert len(notes) == 1 and "beta = workers * alpha = 1.2 >= 1" in notes[0]
    assert Config(algo="easgd").resolve(workers=1).alpha == 0.5, "one worker: alpha 0.5 (README)"


def test_topology_roles():
    roles = [Topology.build(5, r, "easgd").role for r in range(5)]
    assert roles == ["server", "worker", "worker", "worker", "tester"]
    t = Topology.build(5, 2, "easgd")
    assert (t.num_workers, t.worker_index, t.tester_rank, t.logs) == (3, 1, 4, False)
    assert Topology.build(5, 4, "downpour").logs
    assert {Topology.build(2, r, "sgd").role for r in range(2)} == {"peer"}
    assert Topology.build(2, 0, "ea").logs and not Topology.build(2, 1, "ea").logs
    with pytest.raises(ConfigError, match="needs at least 3 ranks .*got 2"):
        Topology.build(2, 0, "easgd")


@pytest.mark.parametrize("name,shape,params", [
    ("lenet", (1, 28, 28), 61_706),
    ("cifarnet", (3, 32, 32), 4_328_970),
    ("resnet20", (3, 32, 32), 272_474),
    ("convmlp", (3, 32, 32), 9_449_194),
])
def test_models_build_and_run(name, shape, params):
    model = build_model(name, shape, 10)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


def test_unknown_model():
    with pytest.raises(ModelError, match="unknown model 'vgg'"):
        check_model_name("vgg")


def test_torchvision_models_load_or_fail_clearly():
    try:
        model = build_model("torchvision:resnet18", (3, 32, 32), 10)
    except ModelError as exc:
        assert "torchvision" in str(exc)
    else:
        assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ModelError):
        build_model("torchvision:no_such_model", (3, 32, 32), 10)


def test_config_round_trips_through_written_toml(tmp_path):
    from mpi_easgd.runtime.metrics import RunLog

    cfg = Config(algo="sgd", lr=0.2).resolve(2)
    RunLog(tmp_path, vars(cfg), progress=False)
    again = Config.from_toml(tmp_path / "config.toml")
    assert again == cfg
    assert np.isclose(again.alpha, 0.45)


def test_checkpoint_schedules_take_hours_minutes_seconds_and_steps():
    from mpi_easgd.config import parse_every

    assert parse_every("1h") == (None, 3600) and parse_every("10m") == (None, 600)
    assert parse_every("30s") == (None, 30) and parse_every("500") == (500, None)
    with pytest.raises(ValueError, match="1h, 10m, 30s"):
        parse_every("1d")


def test_plot_labels_tell_runs_apart(tmp_path):
    """Two easgd runs, and an unfinished one, each get their own label: the run directory,
    then algorithm, workers (not ranks) and tau."""
    import json

    from mpi_easgd.plot import load_run, main

    for name, summary in (("a", {"algo": "easgd", "workers": 2, "world_size": 4}), ("b", {"algo": "easgd",
                          "workers": 2, "world_size": 4}), ("cut", None)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.toml").write_text('algo = "easgd"\ntau = 10\n')
        (run / "metrics.csv").write_text("wall_time,epoch,step,samples,train_loss,test_loss,test_accuracy\n"
                                         "1.0,1,10,320,0.5,0.4,0.9\n2.0,2,20,640,0.3,0.2,0.98\n")
        if summary:
            (run / "summary.json").write_text(json.dumps(summary))
    labels = [load_run(tmp_path / n)[0] for n in ("a", "b", "cut")]
    assert labels == ["a (easgd, 2 workers, tau 10)", "b (easgd, 2 workers, tau 10)", "cut (easgd, tau 10, unfinished)"]
    assert main([str(tmp_path / n) for n in ("a", "b", "cut")] + ["-o", str(tmp_path / "p.png")]) == 0


def test_written_files_are_readable_by_others_as_the_umask_allows(tmp_path, blobs):
    import os
    import stat

    from mpi_easgd.data import write_dataset

    old = os.umask(0o022)
    try:
        x = np.zeros((4, 1, 8, 8), np.uint8)
        path = write_dataset(tmp_path / "d.h5", (x, np.zeros(4)), (x, np.zeros(4)), num_classes=2, name="d")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_ctrl_c_asks_for_a_checkpoint_instead_of_raising():
    """SIGINT (Ctrl-C on a laptop) is a stop request like SIGTERM: no KeyboardInterrupt
    unwinds the ranks; the loop checkpoints and the job exits 75."""
    import os
    import signal

    from mpi_easgd.runtime.control import StopRequest

    previous = {s: signal.getsignal(s) for s in StopRequest.SIGNALS}
    try:
        stop = StopRequest().install()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signum == signal.SIGINT
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_a_failing_liveness_thread_ends_the_job_with_one_line(monkeypatch, capsys):
    """An exception in the watchdog thread must not end liveness silently (the peers would
    then blame a healthy rank): it ends the job, saying why."""
    import mpi_easgd.runtime.watchdog as watchdog

    ended = []
    monkeypatch.setattr(watchdog, "abort", lambda comm, status: ended.append(status))

    def broken_tick():
        raise ValueError("boom")

    dog = watchdog.Watchdog(None, 0.04, str, tick=broken_tick).start()
    dog._thread.join(5)
    assert ended == [1]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the liveness thread failed (ValueError: boom); ending the job" in err


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


def test_checkpoint_schedule_counts_from_the_last_checkpoint():
    from mpi_easgd.runtime.schedule import Schedule

    steps = Schedule("5", step=20, now=0.0)
    assert [s for s in range(20, 31) if steps.due(s, 0.0)] == [25, 26, 27, 28, 29, 30]
    steps.mark(25, 0.0)
    assert not steps.due(29, 0.0) and steps.due(30, 0.0)
    clock = Schedule("30s", now=100.0)
    assert not clock.due(1, 129.0) and clock.due(1, 130.0) and not clock.due(0, 500.0)
    assert not Schedule("").due(10**6, 10**9)
