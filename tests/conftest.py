"""Shared fixtures: launching real ``mpiexec`` jobs with a timeout, and small datasets."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def find_mpiexec() -> str:
    """The mpiexec next to this Python (the venv's MPI) before any other on PATH."""
    local = Path(sys.executable).with_name("mpiexec")
    if local.exists():
        return str(local)
    found = shutil.which("mpiexec")
    if not found:
        pytest.skip("no mpiexec found")
    return found


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


_RUNNING: list = []  # the test being run


def pytest_runtest_setup(item) -> None:
    _RUNNING[:] = [item]


def require_launch_marker() -> None:
    """A test that starts a job must say so (``@pytest.mark.launch``): ``pytest -m 'not
    launch'`` then runs everything in-process, in seconds."""
    if _RUNNING and _RUNNING[0].get_closest_marker("launch") is None:
        pytest.fail(f"{_RUNNING[0].nodeid} starts an MPI job: mark it (or its module) with pytest.mark.launch")


def launch(n: int, *args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``mpiexec -n n python ARGS`` in its own process group (so that a timeout can
    kill every rank, not just the launcher), with text pipes for stdout and stderr."""
    require_launch_marker()
    cmd = [find_mpiexec(), "-n", str(n), sys.executable, *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, cwd=cwd or ROOT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float, what: str) -> tuple[str, str]:
    """Wait for ``proc``; on a hang kill its whole process group and fail the test."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{what} hung for {timeout}s\n{out}\n{err}")


def mpirun(n: int, *args: str, timeout: float = 120, env: dict | None = None,
           cwd: Path | None = None) -> Result:
    """Run ``mpiexec -n n python ARGS`` and return its result; fail the test on a hang."""
    import time

    start = time.perf_counter()
    proc = launch(n, *args, env=env, cwd=cwd)
    out, err = finish(proc, timeout, f"mpiexec -n {n} {' '.join(args)}")
    return Result(proc.returncode, out, err, time.perf_counter() - start)


def spmd(ranks: int, *files: str, timeout: float = 240, env: dict | None = None) -> Result:
    """Run the SPMD test ``files`` on ``ranks`` ranks (``python -m mpi4py -m pytest``: a
    failure on one rank aborts the job instead of hanging it); every rank must pass."""
    # --capture=sys: a rank that fails writes its traceback (and MPI its abort line) to the real
    # stderr; fd-level capture would swallow both when the job is aborted.
    result = mpirun(ranks, "-m", "mpi4py", "-m", "pytest", "-q", "-x", "--capture=sys", "-p", "no:cacheprovider",
                    *files, timeout=timeout, env=env)
    assert result.returncode == 0, result.output
    assert result.output.count(" passed") == ranks and " failed" not in result.output, result.output
    return result


def openmpi_prefix() -> Path:
    """The Open MPI that fault-tolerant tests run under (``make install`` puts it in the
    venv's ``openmpi/``); skips the test when there is none, fails it under CI
    (``MPI_EASGD_REQUIRE_ULFM=1``)."""
    prefix = Path(os.environ.get("MPI_EASGD_OPENMPI", Path(sys.prefix) / "openmpi"))
    if not (prefix / "bin" / "mpirun").exists():
        if os.environ.get("MPI_EASGD_REQUIRE_ULFM") == "1":
            pytest.fail(f"no Open MPI at {prefix} (make install puts one there)")
        pytest.skip(f"no Open MPI at {prefix}: fault-tolerant tests need make install")
    return prefix


def ulfm_launch(n: int, *args: str, env: dict | None = None, ft: bool = True) -> subprocess.Popen:
    """Start ``mpirun --with-ft ulfm -n n python ARGS`` on Open MPI (``ft=False``: without
    ``--with-ft ulfm``), in its own process group."""
    prefix = openmpi_prefix()
    cmd = [str(prefix / "bin" / "mpirun"), *(["--with-ft", "ulfm"] if ft else []), "-n", str(n),
           sys.executable, *args]
    from mpi_easgd.runtime.ft import openmpi_environment

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **openmpi_environment(prefix), **(env or {})}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, cwd=ROOT, start_new_session=True)


def left_behind(proc: subprocess.Popen) -> list[str]:
    """Processes of a finished launch's session still alive (``ps`` lines)."""
    out = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-s", str(proc.pid)], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line.split()[1][0] != "Z"]


def ulfm_train(n: int, *flags: str, timeout: float = 120, env: dict | None = None, script: str | None = None) -> Result:
    """``mpirun --with-ft ulfm -n n python -m mpi_easgd.train FLAGS`` (or ``python -m
    mpi4py SCRIPT FLAGS``); fails the test on a hang or on a process left behind."""
    import time

    start = time.perf_counter()
    command = ["-m", "mpi4py", script] if script else ["-m", "mpi_easgd.train", "--no-progress"]
    proc = ulfm_launch(n, *command, *flags, env=env)
    out, err = finish(proc, timeout, f"mpirun --with-ft ulfm -n {n} {' '.join(flags)}")
    deadline = time.monotonic() + 5  # (ranks that MPI_Abort ended may take a moment to go)
    while (left := left_behind(proc)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        for line in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
        pytest.fail("processes left behind:\n" + "\n".join(left) + f"\n{out}\n{err}")
    return Result(proc.returncode, out, err, time.perf_counter() - start)


def train(n: int, *flags: str, timeout: float = 180, env: dict | None = None) -> Result:
    """``mpiexec -n n python -m mpi_easgd.train FLAGS``."""
    return mpirun(n, "-m", "mpi_easgd.train", "--no-progress", *flags, timeout=timeout, env=env)


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="session", autouse=True)
def flight_records(tmp_path_factory):
    """Flight records a test's watchdog writes (outside a run directory) go to a temporary
    folder, not ./mpi_easgd-flight in the checkout."""
    folder = os.environ.get("MPI_EASGD_FLIGHT_DIR") or str(tmp_path_factory.mktemp("flight"))
    os.environ["MPI_EASGD_FLIGHT_DIR"] = folder
    return Path(folder)


@pytest.fixture(scope="session", autouse=True)
def dataset_cache(tmp_path_factory):
    """Keep built-in datasets in a per-session cache, not in the user's home."""
    cache = os.environ.get("MPI_EASGD_CACHE") or str(tmp_path_factory.mktemp("cache"))
    os.environ["MPI_EASGD_CACHE"] = cache
    return Path(cache)


def make_blobs(path: Path, n_train: int = 512, n_test: int = 128, classes: int = 4,
               shape=(1, 8, 8), seed: int = 0) -> Path:
    """A small learnable dataset: each class is a fixed random image plus noise."""
    from mpi_easgd.data import write_dataset

    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, size=(classes, *shape))

    def split(n):
        y = rng.integers(0, classes, size=n)
        x = np.clip(protos[y] + rng.normal(0, 40, size=(n, *shape)), 0, 255).astype(np.uint8)
        return x, y

    return write_dataset(path, split(n_train), split(n_test), num_classes=classes, name="blobs")


@pytest.fixture(scope="session")
def blobs(tmp_path_factory) -> Path:
    return make_blobs(tmp_path_factory.mktemp("data") / "blobs.h5")


def make_cifar(folder, hundred=False):
    """CIFAR-10 (or, ``hundred``, CIFAR-100) python batches of random images in ``folder``;
    returns each file's (images, labels)."""
    import pickle

    rng = np.random.default_rng(0)
    folder.mkdir()
    out = {}
    names = [("train", 40), ("test", 10)] if hundred else [(f"data_batch_{i}", 8) for i in range(1, 6)] + [
        ("test_batch", 10)]
    for name, n in names:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        if hundred:
            d = {b"data": x, b"fine_labels": list(np.arange(n) % 100),
                 b"coarse_labels": list(np.arange(n) % 20)}
        else:
            d = {b"data": x, b"labels": list(np.arange(n) % 10)}
        with open(folder / name, "wb") as fh:
            pickle.dump(d, fh, protocol=2)
        out[name] = (x.reshape(-1, 3, 32, 32), np.arange(n) % (100 if hundred else 10))
    return out
