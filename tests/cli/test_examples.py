"""The README's own-script example runs as documented, learns, and ends on uneven shards:
with AllReduceSGD and with AllReduceEA, one after the other in one job (each run is the
script as ``__main__``, as ``python -m mpi4py examples/own_script.py FLAGS`` runs it)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import mpirun

pytestmark = pytest.mark.launch

RUNS = {"AllReduceSGD": ["--uneven"], "AllReduceEA": ["--ea", "--uneven"]}


def test_own_script_example():
    runs = [["examples/own_script.py", *flags] for flags in RUNS.values()]
    code = f"import runpy, sys\nfor sys.argv in {runs!r}:\n    runpy.run_path(sys.argv[0], run_name='__main__')"
    r = mpirun(2, "-m", "mpi4py", "-c", code, timeout=180)
    assert r.returncode == 0, r.output
    accuracies = [float(a) for a in re.findall(r"test accuracy ([\d.]+)", r.stdout)]  # rank 0's, run after run
    assert len(accuracies) == 5 * len(RUNS), r.stdout
    for name, last in zip(RUNS, accuracies[4::5]):
        assert last > 0.8, (name, r.stdout)


def test_async_script_example(tmp_path):
    """examples/async_regression.py: AsyncTraining around a loop of its own (a regression
    MLP, its own data, metric and rule), under mpiexec with 4 ranks: it learns."""
    r = mpirun(4, "-m", "mpi4py", "examples/async_regression.py", "--out", str(tmp_path), timeout=180)
    assert r.returncode == 0, r.output
    mse, baseline = (float(v) for v in re.search(r"test MSE ([\d.]+) \(predicting the mean: ([\d.]+)\)",
                                                  r.stdout).groups())
    assert mse < 0.2 * baseline, r.stdout
    (run,) = tmp_path.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["algo"] == "__main__:StalenessAwareEASGD" and summary["workers"] == 2
    assert "test_mse" in (run / "metrics.csv").read_text().splitlines()[0]
