"""Launch the SPMD collective tests under real mpiexec with 1, 2 and 4 ranks."""

from __future__ import annotations

import pytest
from conftest import mpirun


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_spmd_collectives(ranks):
    result = mpirun(ranks, "-m", "mpi4py", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                    "tests/mpi/spmd_collectives.py", timeout=240)
    assert result.returncode == 0, result.output
    assert result.output.count(" passed") == ranks, result.output
