"""The README's own-script example runs as documented, learns, and ends on uneven shards."""

from __future__ import annotations

import re

import pytest
from conftest import mpirun


@pytest.mark.parametrize("flags", [["--uneven"], ["--ea", "--uneven"]], ids=["AllReduceSGD", "AllReduceEA"])
def test_own_script_example(flags):
    r = mpirun(2, "-m", "mpi4py", "examples/own_script.py", *flags, timeout=120)
    assert r.returncode == 0, r.output
    accuracies = [float(a) for a in re.findall(r"test accuracy ([\d.]+)", r.stdout)]
    assert len(accuracies) == 5 and accuracies[-1] > 0.8, r.stdout
