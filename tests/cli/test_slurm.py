"""The jobs/*.sbatch scripts against a real SLURM on this machine: srun (PMI-2) and
mpiexec inside an allocation, and the preemption path (signal -> checkpoint -> requeue ->
resume). Needs Debian's slurmctld/slurmd/munge (``.ci/run`` installs them); skipped
where they are absent unless MPI_EASGD_REQUIRE_SLURM=1 (CI), where that is a failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from slurm_cluster import LocalSlurm

pytestmark = [pytest.mark.launch, pytest.mark.slurm]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if not LocalSlurm.available():
        if os.environ.get("MPI_EASGD_REQUIRE_SLURM") == "1":
            pytest.fail("SLURM is required here but slurmctld/slurmd/sbatch/munged are not installed")
        pytest.skip("SLURM is not installed (apt-get install slurmctld slurmd slurm-client munge)")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def submit(slurm: LocalSlurm, script: str, tmp_path: Path, tasks: int, **env) -> str:
    job_env = {**slurm.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               "PYTHON": sys.executable, "OUT": str(tmp_path / "runs"), **env}
    r = slurm.run("sbatch", "--parsable", f"--ntasks-per-node={tasks}",
                  f"--output={tmp_path}/%x-%j.out", f"jobs/{script}", cwd=ROOT, env=job_env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def finished(slurm, job, tmp_path, timeout=240, name="mpi_easgd"):
    state = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout)
    log = (tmp_path / f"{name}-{job}.out").read_text()
    if state not in ("COMPLETED", "FAILED", "CANCELLED"):  # what is still running, and in what state
        log += "\nprocesses:\n" + subprocess.run(["ps", "-eo", "pid,ppid,stat,etime,wchan:20,args", "--forest"],
                                                   capture_output=True, text=True).stdout
    return state, log


@pytest.mark.parametrize("script,config,tasks", [
    ("cpu-single-node.sbatch", "mnist_sgd", 2),
    ("cpu-mpirun.sbatch", "mnist_easgd", 3),
], ids=["srun-sgd", "mpirun-easgd"])
def test_job_script_trains_and_writes_its_run_directory(slurm, tmp_path, script, config, tasks):
    job = submit(slurm, script, tmp_path, tasks, CONFIG=f"jobs/configs/{config}.toml", ARGS="--epochs 2")
    state, log = finished(slurm, job, tmp_path)
    assert state == "COMPLETED", log
    summary = json.loads((tmp_path / "runs" / f"mpi_easgd-{job}" / "summary.json").read_text())
    assert summary["world_size"] == tasks and summary["epochs"] == 2
    assert summary["test_accuracy"] > 0.5, summary


def test_preemption_signal_checkpoints_requeues_and_resumes(slurm, tmp_path):
    job = submit(slurm, "cpu-single-node.sbatch", tmp_path, 2, CONFIG="jobs/configs/mnist_sgd.toml",
                 ARGS="--epochs 4", MPI_EASGD_FAULT="rank=1,action=sleep,seconds=0.03")
    metrics = tmp_path / "runs" / f"mpi_easgd-{job}" / "metrics.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)  # (the header, the evaluation before the first step, epoch 1)
    assert metrics.exists(), (tmp_path / f"mpi_easgd-{job}.out").read_text()
    # what #SBATCH --signal=B:USR1@120 does before the time limit, sent now
    assert slurm.run("scancel", "--signal=USR1", "--batch", job).returncode == 0
    state = slurm.wait_state(job, {"PENDING", "REQUEUED", "COMPLETED", "FAILED"}, 60)
    assert state in ("PENDING", "REQUEUED"), (state, (tmp_path / f"mpi_easgd-{job}.out").read_text())
    rows_at_stop = len(metrics.read_text().splitlines()) - 1
    assert rows_at_stop < 5
    # Skip SLURM's ~2 minute requeue delay, once the node has finished cleaning up the first
    # start (released too early, the restart is refused with "Job credential revoked").
    deadline = time.monotonic() + 60
    while slurm.run("sinfo", "-h", "-o", "%T").stdout.strip() != "idle" and time.monotonic() < deadline:
        time.sleep(0.3)
    time.sleep(3)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    state, log = finished(slurm, job, tmp_path)
    assert state == "COMPLETED", log
    assert "requeueing job" in log and "start 1 " in log and "resumed from" in log, log
    epochs = [line.split(",")[1] for line in metrics.read_text().splitlines()[1:]]
    assert epochs == ["0", "1", "2", "3", "4"], "each epoch logged once across the requeue (0: before training)"


def test_fault_tolerant_job_script_replaces_a_dead_worker(slurm, tmp_path):
    """jobs/cpu-fault-tolerant.sbatch: Open MPI's mpirun --with-ft ulfm inside the
    allocation, one task left for the spare; a worker killed mid-run is replaced, and so
    is its replacement (then mpirun may exit 137 although the run completed: the script
    reports the run's own outcome)."""
    from conftest import openmpi_prefix

    from mpi_easgd.runtime.ft import openmpi_environment

    ompi = openmpi_environment(openmpi_prefix())
    job = submit(slurm, "cpu-fault-tolerant.sbatch", tmp_path, 5, CONFIG="jobs/configs/mnist_easgd.toml",
                 ARGS="--on-worker-loss respawn --epochs 2",
                 MPI_EASGD_FAULT="rank=2,action=kill,step=40;rank=2,action=kill,step=50,gen=1",
                 **ompi)  # Open MPI's mpirun first on PATH
    state, log = finished(slurm, job, tmp_path, name="mpi_easgd-ft")
    assert state == "COMPLETED", log
    summary = json.loads((tmp_path / "runs" / f"mpi_easgd-ft-{job}" / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["dead_workers"] == [2], log
    assert [r["rank"] for r in summary["replacements"]] == [2, 2], log
