"""Asynchronous runs under their own mpiexec: a raising worker or tester ends the job.

(The audited learning runs of EASGD, EAMSGD and DOWNPOUR run in one job, without a launch
each: tests/mpi/spmd_runs.py.)
"""

from __future__ import annotations

import pytest
from conftest import train

pytestmark = pytest.mark.launch


@pytest.mark.parametrize("victim", ["1", "3"], ids=["worker", "tester"])
def test_a_raising_worker_or_tester_ends_the_job(victim, tmp_path):
    r = train(4, "--algo", "easgd", "--epochs", "50", "--test-every", "0.2", "--out", str(tmp_path),
              env={"MPI_EASGD_FAULT": f"rank={victim},action=raise,step=2"}, timeout=60)
    assert r.returncode != 0
    assert "InjectedFault" in r.stderr
    assert r.seconds < 30
