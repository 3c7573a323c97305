"""Commands the README shows that no other test runs: one process without a launcher,
--help, and the benchmark scripts (at tiny sizes: that they run, not what they measure)."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, mpirun, read_summary

import mpi_easgd

pytestmark = pytest.mark.launch


def test_single_process_without_a_launcher(blobs, tmp_path):
    # ea with 16-bit exchanges: the one-rank path of the elastic rounds and the user-defined sum
    r = subprocess.run([sys.executable, "-m", "mpi_easgd.train", "--algo", "ea", "--exchange-dtype", "bfloat16",
                        "--tau", "4", "--dataset", str(blobs), "--model", "mlp", "--epochs", "1", "--no-progress",
                        "--out", str(tmp_path), "--run-name", "solo"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    summary = read_summary(tmp_path / "solo")
    assert summary["world_size"] == 1 and summary["test_accuracy"] > 0.5
    env = summary["environment"]  # what the run ran on
    assert env["ranks"] == 1 and env["hosts"] == [socket.gethostname()] and env["mpi4py"] and env["torch"]
    assert env["mpi_library"].startswith(("MPICH", "Open MPI")) and env["mpi_thread_level"] == "multiple"
    assert env["git_commit"] and env["mpi_easgd"] == mpi_easgd.__version__


def test_help_lists_every_flag():
    r = subprocess.run([sys.executable, "-m", "mpi_easgd.train", "--help"], capture_output=True,
                       env={**os.environ, "COLUMNS": "250"}, text=True, timeout=60)
    assert r.returncode == 0
    for flag in ("--algo", "--tau", "--alpha", "--batch-size", "--config", "--tensorboard", "--augment"):
        assert flag in r.stdout
    text = " ".join(r.stdout.split())
    assert "(default: None)" not in text, "one default per flag, stated in its help"
    assert "(mlp, lenet, cifarnet, resnet20" in text and "ALGO-MODEL-YYYYmmdd-HHMMSS" in text
    assert "0.9 / workers, at most 0.5" in text


def test_benchmark_scripts_run():
    # Both MPI benchmarks in one launch (each script runs as __main__ in turn): one start-up, not two.
    runs = [["benchmarks/allreduce_overhead.py", "--models", "lenet", "--pairs", "1"],
            ["benchmarks/sgd_vs_ddp.py", "--models", "lenet", "--pairs", "1", "--steps", "2"]]
    code = f"import runpy, sys\nfor sys.argv in {runs!r}:\n    runpy.run_path(sys.argv[0], run_name='__main__')"
    r = mpirun(2, "-m", "mpi4py", "-c", code, timeout=180)
    assert r.returncode == 0 and "ratio" in r.stdout and "DDP samples/s" in r.stdout, r.output
    assert sum(line.startswith("lenet") for line in r.stdout.splitlines()) == 2, r.output
    r = subprocess.run([sys.executable, "benchmarks/input_pipeline.py", "--samples", "512", "--repeats", "1"],
                       capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0 and "resnet20" in r.stdout, r.stderr


def test_async_benchmark_scripts_run(tmp_path):
    # (benchmarks/server_throughput.py runs in tests/mpi/spmd_server.py, in the server's job)
    r = subprocess.run([sys.executable, "benchmarks/time_to_accuracy.py", "--taus", "10", "--epochs", "1",
                        "--target", "0.5", "--algos", "easgd", "--workers", "1", "--straggler", "3", "--step-ms",
                        "1", "--exchange-delay-ms", "5", "--overlap-modes", "on", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader((tmp_path / "time_to_accuracy.csv").open()))
    assert len(rows) == 1 and (rows[0]["algo"], rows[0]["tau"]) == ("easgd", "10")
    picked = ("ranks", "workers", "straggler", "overlap", "exchange_delay_ms")
    assert [rows[0][k] for k in picked] == ["3", "1", "3.0", "on", "5.0"]
    assert (tmp_path / "time_to_accuracy.png").stat().st_size > 10_000


def test_gpu_selftest_without_a_gpu_says_so_in_one_line():
    import torch

    if torch.cuda.is_available():
        return  # on a GPU node the self-test runs for real (jobs/gpu_selftest.sh)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", "jobs/gpu_selftest.sh"], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "no CUDA device is visible" in r.stderr and "Traceback" not in r.stderr
