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
    ("servers = 0", "--servers must be an integer >= 1"),
    ('algo = "sgd"\nservers = 2', "--servers applies to the async algorithms .*sgd has no server"),
    ('algo = "easgd"\nservers = 2\non_worker_loss = "respawn"', "respawn works with one server rank"),
    ('algo = "easgd"\ngroups = "two"', "--groups must be a number of ranks >= 1 or 'node'; got 'two'"),
    ('algo = "ea"\ngroups = "node"', "--groups and --group-tau apply to the async algorithms .*HierarchicalAveraging"),
    ('algo = "easgd"\ngroup_tau = 2', "--group-tau needs --groups"),
    ('algo = "easgd"\ngroups = "2"\noverlap_exchange = true', "--groups works with blocking exchanges"),
    ('algo = "easgd"\ngroups = "2"\non_worker_loss = "continue"', "--groups works with --on-worker-loss abort"),
    ('algo = "ea"\naccept_joiners = true', "--accept-joiners needs an asynchronous algorithm"),
    ('algo = "easgd"\nservers = 2\naccept_joiners = true', "with one server rank and no --groups"),
    ('algo = "downpour"\nkeep_global_batch = true', "--keep-global-batch applies to sgd, ea(,| and) diloco.*drop"),
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


def test_groups_count_one_exchanging_worker_each():
    cfg = Config(algo="easgd", groups="2").resolve(workers=5)  # 3 groups exchange
    assert cfg.alpha == pytest.approx(0.3) and cfg.exchanging(5) == 3
    assert Config(algo="async-diloco", groups="2").resolve(4).outer_delay == 2
    assert Config(algo="easgd", groups="node").exchanging(4) == 4  # (known when the run starts)


def test_topology_with_the_center_over_two_servers():
    roles = [Topology.build(6, r, "easgd", servers=2).role for r in range(6)]
    assert roles == ["server", "shard", "worker", "worker", "worker", "tester"]
    t = Topology.build(6, 3, "easgd", servers=2)
    assert (t.server_ranks, t.worker_ranks, t.worker_index, t.num_workers) == ([0, 1], [2, 3, 4], 1, 3)
    with pytest.raises(ConfigError, match="needs at least 5 ranks .*3 servers.*got 4.*lower --servers"):
        Topology.build(4, 0, "easgd", servers=3)


def test_shard_bounds_cover_the_center_in_aligned_near_equal_pieces():
    from mpi_easgd.ps.protocol import shard_bounds

    assert shard_bounds(10, 1) == [(0, 10)]
    assert shard_bounds(11_173_962, 2) == [(0, 5_591_040), (5_591_040, 11_173_962)]  # resnet18: 4096-aligned
    assert shard_bounds(61_706, 4) == [(0, 16_384), (16_384, 32_768), (32_768, 49_152), (49_152, 61_706)]
    assert shard_bounds(10, 3) == [(0, 4), (4, 8), (8, 10)]  # too small to align: near-equal
    assert shard_bounds(12_289, 3) == [(0, 4_097), (4_097, 8_194), (8_194, 12_289)]  # aligned: one empty
    for n, s in ((61_706, 3), (1_000_003, 7), (5, 5), (12_289, 3), (4_096 * 3, 3)):
        bounds = shard_bounds(n, s)
        assert bounds[0][0] == 0 and bounds[-1][1] == n and all(b > a for a, b in bounds)
        assert all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:]))
    with pytest.raises(ValueError, match="cannot split 3 parameters over 4 server ranks"):
        shard_bounds(3, 4)


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
