"""The configuration (defaults, TOML, flags, validation of values) and the topology."""

from __future__ import annotations

import numpy as np
import pytest

from mpi_easgd.config import Config, ConfigError, parse_args
from mpi_easgd.topology import Topology


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
    with pytest.raises(ConfigError, match="unknown algorithm 'adam'; choose one of sgd, ea, diloco, easgd"):
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
    topk = Config(algo="async-diloco", exchange_dtype="topk").resolve(2).advice(2, 1000, (3, 32, 32), "cifar10")
    assert len(topk) == 1 and "--outer-momentum 0.5 kept them stable" in topk[0]
    assert Config(algo="async-diloco", exchange_dtype="topk", outer_momentum=0.5).resolve(2).advice(
        2, 1000, (3, 32, 32), "cifar10") == []


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
