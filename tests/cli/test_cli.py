"""The training CLI end to end under mpiexec: bad inputs, failing ranks. (Successful sync
runs, uneven shards included, run in one job without a launch each: tests/mpi/spmd_runs.py.)"""

from __future__ import annotations

import pytest
from conftest import train

pytestmark = pytest.mark.launch


# The job-wide mechanism, once for an error every rank finds and once for one that only
# rank 0 meets (creating the run directory); every other bad input is checked in-process
# with the same messages (tests/cli/test_validation.py).
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


def test_no_mpi_library_is_one_line_naming_what_to_install():
    """The package bundles no MPI (it is an extra): without one, say which to install."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MPI4PY_LIBMPI": "/nonexistent/libmpi.so"}  # as if none were installed
    r = subprocess.run([sys.executable, "-m", "mpi_easgd.train"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("mpi_easgd: error: no MPI library found") and "pip install 'mpi_easgd[mpich]'" in line
