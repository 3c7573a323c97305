"""A user's own asynchronous rule: looked up by its import path, described from the class,
refused in one line when it cannot be used, and replayed by the audit with each exchange's
arrival (in this process; tests/mpi/spmd_runs.py trains with it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mpi_easgd import registry
from mpi_easgd.config import Config, ConfigError
from mpi_easgd.rules.asynchronous import Arrival, ElasticServer, server_rule, worker_rule
from mpi_easgd.rules.audit import AuditLog, replay

RULE = "user_rules:StalenessAwareEASGD"


@pytest.fixture(autouse=True)
def user_folder(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "mpi"))


def test_a_users_rule_is_described_from_its_class():
    algo = registry.lookup(RULE)
    assert algo.is_async and algo.elastic and not algo.nesterov
    assert algo.summary == "Elastic averaging whose center pull is alpha / (1 + staleness)."
    assert registry.lookup(algo.load()) is algo, "the class itself names the same algorithm"
    cfg = Config(algo=RULE).resolve(3)
    cfg.validate()
    assert algo.settings(cfg, 3) == dict(tau=10, alpha=0.3, beta=pytest.approx(0.9), exchange_dtype="float32",
                                         overlap_exchange=False)
    x = torch.zeros(4)
    assert type(worker_rule(RULE, x, 0.3)).__name__ == "ElasticWorker"


def test_staleness_damps_the_pull_and_fresh_exchanges_are_easgd():
    center, x = torch.zeros(3), torch.full((3,), 8.0)
    rule, easgd = server_rule(RULE, alpha=0.5), ElasticServer("easgd", alpha=0.5)
    fresh, reply = rule.apply(center, x.clone(), Arrival(0, 0, 5))
    assert torch.equal(fresh, easgd.apply(center, x.clone())[0]) and reply is center
    stale, _ = rule.apply(center, x.clone(), Arrival(1, 3, 6))
    assert torch.equal(stale, torch.full((3,), 1.0)) and rule.damped == 1  # 8 * 0.5 / 4


@pytest.mark.parametrize("name,message", [
    ("no_such_module:Rule", "cannot import no_such_module"),
    ("user_rules:Missing", "user_rules has no Missing"),
    ("json:dumps", "is not a rule: name a subclass of mpi_easgd.rules.asynchronous.ServerRule"),
    ("mpi_easgd.rules.asynchronous:ServerRule", "has no worker side"),
    ("adam", "unknown algorithm 'adam'"),
])
def test_a_rule_that_cannot_be_used_is_one_line(name, message):
    with pytest.raises(ConfigError, match=message) as error:
        Config(algo=name).validate()
    assert "\n" not in str(error.value)


def test_the_audit_replays_a_users_rule_with_each_arrival(tmp_path):
    torch.manual_seed(0)
    rule = server_rule(RULE, alpha=0.4)
    center = torch.randn(6)
    log = AuditLog(center, rule)
    for version, (worker, staleness) in enumerate([(0, 0), (1, 0), (0, 1), (2, 2), (1, 2)]):
        x = torch.randn(6)
        arrival = Arrival(worker, staleness, version)
        log.record(arrival, x)
        center, _ = rule.apply(center, x.clone(), arrival)
    log.write(tmp_path / "audit.npz", rule, center)
    replayed, final = replay(tmp_path / "audit.npz")
    assert torch.equal(replayed, final)
    ignoring = AuditLog(log.initial[0], server_rule(RULE, alpha=0.4))  # the same payloads, all fresh
    ignoring.exchanges = [(Arrival(a.worker, 0, a.version), x) for a, x in log.exchanges]
    ignoring.write(tmp_path / "fresh.npz", rule, center)
    assert not torch.equal(replay(tmp_path / "fresh.npz")[0], final), "the arrivals matter to this rule"
