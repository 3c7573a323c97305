"""A worker started on its own joins a running async run (``python -m mpi_easgd.join``),
under real ``mpiexec`` (MPICH joins two separately started jobs)."""

from __future__ import annotations

import pytest
from conftest import finish, launch, mpirun, read_summary

pytestmark = pytest.mark.launch


def test_a_worker_started_later_joins_a_running_run_and_counts_in_its_summary(tmp_path, blobs, capsys):
    """The joiner is started with the run and waits for its door; it gets the center and a
    share of the data, exchanges as a worker, and the summary counts it. The door closes
    at the end: a joiner then is told so in one line."""
    pace = {"MPI_EASGD_FAULT": "rank=1,action=sleep,seconds=0.015;rank=2,action=sleep,seconds=0.015"}
    run = launch(4, "-m", "mpi_easgd.train", "--no-progress", "--algo", "easgd", "--dataset", str(blobs), "--model",
                 "mlp", "--epochs", "36", "--batch-size", "16", "--accept-joiners", "--out", str(tmp_path),
                 "--run-name", "r", env=pace)  # (16 steps an epoch of 15+ ms: it trains for 9 s or more)
    joiner = mpirun(1, "-m", "mpi_easgd.join", str(tmp_path / "r"), timeout=150)
    out, err = finish(run, 150, "the run")
    assert run.returncode == 0 and joiner.returncode == 0, f"{out}\n{err}\n{joiner.output}"
    assert "a worker joined the run (rank 4, from epoch" in err, err
    summary = read_summary(tmp_path / "r")
    (joined,) = [w for w in summary["per_worker"] if w.get("joined")]
    assert joined["rank"] == 4 and joined["exchanges"] == joined["server_exchanges"] > 0, joined
    assert 0 < joined["seconds_to_first_exchange"] < 5, joined
    assert summary["train_samples"] == sum(w["samples"] for w in summary["per_worker"]) > 36 * 512, summary
    assert summary["test_accuracy"] > 0.6
    assert not (tmp_path / "r" / "join.json").exists()
    from mpi_easgd.join import main  # (what it checks before MPI starts)

    assert main([str(tmp_path / "r"), "--wait", "0"]) == 2
    assert "takes no joiners: start the async run with --accept-joiners" in capsys.readouterr().err
