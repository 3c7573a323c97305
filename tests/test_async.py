"""Asynchronous EASGD / EAMSGD / DOWNPOUR under mpiexec with 4-5 ranks.

Each audited run checks: every worker's exchange count is what its steps imply and what
the server counted (nothing lost); replaying the server's log of arrivals through the pure
update rule reproduces the final center bitwise (nothing applied twice or skipped); the
payloads the server logged per worker are, in order, what that worker sent.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import read_summary, train

from mpi_easgd.algorithms.easgd import ServerRule


def check_audit(run, summary, tau):
    audit = np.load(run / "audit.npz")
    workers = summary["per_worker"]
    for w in workers:
        assert w["exchanges"] == math.ceil(w["steps"] / tau) + 1  # every tau steps + the flush
        assert w["server_exchanges"] == w["exchanges"] == w["reported_exchanges"]
    assert summary["exchanges"] == sum(w["exchanges"] for w in workers) == len(audit["order"])
    rule = ServerRule(str(audit["algo"]), float(audit["alpha"]))
    center = torch.from_numpy(audit["initial"]).clone()
    for payload in audit["payloads"]:
        center, _ = rule.apply(center, torch.from_numpy(payload.copy()))
    assert torch.equal(center, torch.from_numpy(audit["final"])), "replay differs from the center"
    for i, w in enumerate(workers):
        received = audit["payloads"][audit["order"] == i].astype(np.float64).sum(axis=1)
        np.testing.assert_allclose(received, w["audit_checksums"], rtol=1e-9)
    saved = torch.load(run / "center.pt")  # lenet: parameters only, no buffers
    flat = torch.cat([v.reshape(-1) for v in saved.values()])
    assert torch.equal(flat, torch.from_numpy(audit["final"])), "center.pt is not the final center"


@pytest.mark.parametrize("algo,ranks,tau", [("easgd", 4, 4), ("eamsgd", 5, 8), ("downpour", 4, 4)])
def test_async_run_learns_and_loses_no_update(algo, ranks, tau, tmp_path):
    r = train(ranks, "--algo", algo, "--epochs", "3", "--tau", str(tau), "--audit", "--test-every", "0.5",
              "--out", str(tmp_path), "--run-name", "run")
    assert r.returncode == 0, r.output
    summary = read_summary(tmp_path / "run")
    assert summary["workers"] == ranks - 2
    assert summary["beta"] == pytest.approx(summary["alpha"] * (ranks - 2))
    assert summary["test_accuracy"] > 0.8, "mnist5k must be learnt well above chance (0.1)"
    for w in summary["per_worker"]:
        assert w["latency_ms_p50"] <= w["latency_ms_p99"]
        assert w["staleness_mean"] >= 0
    assert 0 < summary["server_busy_fraction"] < 1
    check_audit(tmp_path / "run", summary, tau)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert all(float(row.split(",")[4]) > 0 for row in rows[1:]), "every row has the center's train_loss"
    assert "run summary" in r.stdout and "latency_ms_p99" in r.stdout


@pytest.mark.parametrize("victim", ["1", "3"], ids=["worker", "tester"])
def test_a_raising_worker_or_tester_ends_the_job(victim, tmp_path):
    r = train(4, "--algo", "easgd", "--epochs", "50", "--test-every", "0.2", "--out", str(tmp_path),
              env={"MPI_EASGD_FAULT": f"rank={victim},action=raise,step=2"}, timeout=60)
    assert r.returncode != 0
    assert "InjectedFault" in r.stderr
    assert r.seconds < 30
