"""A user's script around AsyncTraining (tests/mpi/api_script.py) under its own launcher,
for what only a launch shows: a stop signal's exit status 75 and the resume, a worker's
death under ULFM, and the one-line refusals."""

from __future__ import annotations

import signal
import time

import pytest
import torch
from conftest import finish, launch, read_summary, ulfm_train

pytestmark = pytest.mark.launch

SCRIPT = "tests/mpi/api_script.py"


def test_a_script_stopped_by_a_signal_checkpoints_exits_75_and_resumes(tmp_path):
    run = tmp_path / "stop"
    args = ["--algo", "easgd", "--epochs", "4", "--test-every", "0.3", "--out", str(tmp_path), "--run-name", "stop"]
    proc = launch(4, "-m", "mpi4py", SCRIPT, *args, env={"MPI_EASGD_FAULT": "rank=2,action=sleep,seconds=0.03"})
    metrics, deadline = run / "metrics.csv", time.monotonic() + 60
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # mpiexec forwards it to every rank
    _, err = finish(proc, 60, "the script after SIGTERM")
    assert proc.returncode == 75, err
    assert "continue with resume='auto'" in err
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    saved = {r: torch.load(ckpt / f"rank-{r:05d}.pt", weights_only=True)["position"] for r in (1, 2)}
    assert all(0 < p["t"] < 4 * 62 for p in saved.values()), saved
    proc = launch(4, "-m", "mpi4py", SCRIPT, *args, "--resume", "auto")
    out, err = finish(proc, 120, "the resumed script")
    assert proc.returncode == 0, err
    summary = read_summary(run)
    for w in summary["per_worker"]:
        assert w["steps"] == 4 * (2000 // 32), "every worker finished all its epochs across the stop"
        assert w["exchanges"] == w["server_exchanges"] == w["reported_exchanges"]
    assert summary["final_metrics"]["test_accuracy"] > 0.9
    assert summary["environment"]["ranks"] == 4 and summary["algo"] == "easgd"


def test_a_script_asking_for_respawn_without_ulfm_is_refused_in_one_line(tmp_path):
    """As the command line is: on MPICH, on_worker_loss="respawn" names what to install."""
    proc = launch(4, "-m", "mpi4py", SCRIPT, "--on-worker-loss", "respawn", "--out", str(tmp_path))
    out, err = finish(proc, 60, "the refused script")
    assert proc.returncode == 2, err
    assert err.strip().count("\n") == 0 and "needs a fault-tolerant MPI" in err and "Traceback" not in err, err


@pytest.mark.ulfm
def test_a_script_goes_on_without_a_worker_that_died(tmp_path):
    result = ulfm_train(4, "--epochs", "3", "--on-worker-loss", "continue", "--out", str(tmp_path),
                        "--run-name", "kill", script=SCRIPT, env={"MPI_EASGD_FAULT": "rank=2,action=kill,step=40"})
    assert result.returncode == 0, result.output
    assert "worker rank 2 died" in result.stderr, result.output
    summary = read_summary(tmp_path / "kill")
    assert summary["lost_workers"] == [2] and summary["dead_workers"] == [2]
    assert summary["final_metrics"]["test_accuracy"] > 0.9


@pytest.mark.ulfm
def test_a_script_is_rerun_to_replace_a_worker_that_died(tmp_path):
    """on_worker_loss="respawn" from a script: the server reruns the script as a spare, which
    takes the dead worker's rank, shard and exchange count, and the run ends complete. The
    tester dies too: another rerun of the script takes its place with the script's own
    evaluate, and writes the summary."""
    result = ulfm_train(4, "--epochs", "3", "--on-worker-loss", "respawn", "--test-every", "0.5", "--out",
                        str(tmp_path), "--run-name", "respawn", script=SCRIPT, timeout=180,
                        env={"MPI_EASGD_FAULT": "rank=2,action=kill,step=40;rank=3,action=kill,step=1"})
    assert result.returncode == 0, result.output
    summary = read_summary(tmp_path / "respawn")
    (tester,) = summary["tester_replacements"]
    assert tester["rank"] == 3 and "tester_lost" not in summary, summary
    assert summary["dead_workers"] == [2] and summary["lost_workers"] == [], summary
    (replacement,) = summary["replacements"]
    assert replacement["rank"] == 2 and replacement["first_exchange"] is not None
    by_rank = {w["rank"]: w for w in summary["per_worker"]}
    assert by_rank[2]["exchanges"] == by_rank[2]["server_exchanges"] > replacement["exchanges_before"]
    assert summary["final_metrics"]["test_accuracy"] > 0.9
