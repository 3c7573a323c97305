"""The training CLI end to end under mpiexec: synchronous runs, bad inputs, failing ranks."""

from __future__ import annotations

import csv

import pytest
from conftest import make_blobs, read_summary, train

SUMMARY_KEYS = {"algo", "world_size", "workers", "epochs", "test_accuracy", "test_loss",
                "wall_seconds", "train_samples_per_second"}


@pytest.mark.parametrize("algo", ["sgd", "ea"])
def test_sync_run_writes_a_complete_run_directory(algo, blobs, tmp_path):
    r = train(2, "--algo", algo, "--dataset", str(blobs), "--model", "mlp", "--epochs", "3",
              "--batch-size", "16",
              "--tau", "2", "--out", str(tmp_path), "--run-name", "run")
    assert r.returncode == 0, r.output
    run = tmp_path / "run"
    summary = read_summary(run)
    assert SUMMARY_KEYS <= summary.keys()
    assert (summary["algo"], summary["world_size"], summary["epochs"]) == (algo, 2, 3)
    assert summary["test_accuracy"] > 0.6, "4 well-separated classes must be learnt"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    assert int(rows[-1]["samples"]) == 3 * 2 * (256 // 16) * 16
    assert 'algo = "' + algo + '"' in (run / "config.toml").read_text()
    import torch

    from mpi_easgd.models import build_model

    final = torch.load(run / "model.pt", weights_only=True)  # the evaluated model (ea: the center)
    build_model("mlp", (1, 8, 8), 4).load_state_dict(final)
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    state = torch.load(ckpt / "rank-00000.pt", weights_only=True)
    if algo == "sgd":
        assert all(torch.equal(final[k], state["model"][k]) for k in final)
    assert f"run directory: {run}" in r.stdout
    assert r.stdout.count("run summary") == 1, "only one rank prints"


def test_uneven_shards_run_to_the_end(tmp_path):
    data = make_blobs(tmp_path / "odd.h5", n_train=61, n_test=20)
    r = train(3, "--algo", "sgd", "--dataset", str(data), "--model", "mlp", "--uneven", "--batch-size", "10",
              "--epochs", "2", "--out", str(tmp_path), "--run-name", "u")
    assert r.returncode == 0, r.output
    assert read_summary(tmp_path / "u")["train_samples"] == 2 * 61  # shards 20/20/21, all used


# The job-wide mechanism, once for an error every rank finds and once for one that only
# rank 0 meets (creating the run directory); every other bad input is checked in-process
# with the same messages (tests/test_validation.py).
@pytest.mark.parametrize("ranks,flags,message", [
    (2, ["--dataset", "/no/such.h5"], "dataset file /no/such.h5 not found"),
    (2, ["--out", "/proc/forbidden"], "cannot create the run directory"),
])
def test_bad_input_ends_every_rank_with_one_clear_line(ranks, flags, message, blobs, tmp_path):
    dataset = [] if "--dataset" in flags else ["--dataset", str(blobs)]
    flags = flags if "--model" in flags else ["--model", "mlp", *flags]
    out = [] if "--out" in flags else ["--out", str(tmp_path / "runs")]
    r = train(ranks, "--algo", "sgd", *dataset, *out, *flags, timeout=60)
    assert r.returncode == 2, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("mpi_easgd: error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists(), "nothing may be written for a rejected job"


def test_a_raising_rank_ends_the_whole_job_quickly(blobs, tmp_path):
    r = train(3, "--algo", "sgd", "--dataset", str(blobs), "--model", "mlp", "--epochs", "50",
              "--out", str(tmp_path),
              env={"MPI_EASGD_FAULT": "rank=1,action=raise,step=3"}, timeout=60)
    assert r.returncode != 0
    assert "InjectedFault: injected fault at step 3" in r.stderr
    assert r.seconds < 30, f"took {r.seconds:.1f}s to end after a rank failed"
