"""Workers started on their own join a running async run (``python -m mpi_easgd.join``,
and a script's own loop through ``AsyncTraining.join``), under real ``mpiexec`` (MPICH
joins two separately started jobs)."""

from __future__ import annotations

import pytest
from conftest import ROOT, finish, launch, mpirun, read_summary

pytestmark = pytest.mark.launch


def test_workers_started_later_join_a_running_run_and_count_in_its_summary(tmp_path, blobs, capsys):
    """Two joiners are started with the run and wait for its door: the command line's,
    and a user's script (tests/mpi/api_script.py, unchanged, started with
    $MPI_EASGD_JOIN: its AsyncTraining(...) joins, and its own loop trains). Each gets the
    center and data, exchanges as a worker, and the summary counts it. The door closes at
    the end: a joiner then is told so in one line."""
    pace = {"MPI_EASGD_FAULT": "rank=1,action=sleep,seconds=0.015;rank=2,action=sleep,seconds=0.015"}
    run = launch(4, "-m", "mpi_easgd.train", "--no-progress", "--algo", "easgd", "--dataset", str(blobs), "--model",
                 "mlp", "--epochs", "36", "--batch-size", "16", "--accept-joiners", "--out", str(tmp_path),
                 "--run-name", "r", env=pace)  # (16 steps an epoch of 15+ ms: it trains for 9 s or more)
    script = launch(1, str(ROOT / "tests" / "mpi" / "api_script.py"), "--dataset", str(blobs), "--model_name", "mlp",
                    env={"MPI_EASGD_JOIN": str(tmp_path / "r")})
    joiner = mpirun(1, "-m", "mpi_easgd.join", str(tmp_path / "r"), timeout=150)
    out, err = finish(run, 150, "the run")
    script_out, script_err = finish(script, 60, "the script that joined")
    assert run.returncode == joiner.returncode == script.returncode == 0, \
        f"{out}\n{err}\n{joiner.output}\n{script_out}\n{script_err}"
    assert err.count("a worker joined the run (rank ") == 2, err
    summary = read_summary(tmp_path / "r")
    joined = [w for w in summary["per_worker"] if w.get("joined")]
    assert sorted(w["rank"] for w in joined) == [4, 5], joined
    for w in joined:
        assert w["exchanges"] == w["server_exchanges"] > 0 and 0 < w["seconds_to_first_exchange"] < 5, w
    assert summary["train_samples"] == sum(w["samples"] for w in summary["per_worker"]) > 36 * 512, summary
    assert summary["test_accuracy"] > 0.6
    assert not (tmp_path / "r" / "join.json").exists()
    from mpi_easgd.join import main  # (what it checks before MPI starts)

    assert main([str(tmp_path / "r"), "--wait", "0"]) == 2
    assert "takes no joiners: start the async run with --accept-joiners" in capsys.readouterr().err
