"""Launch the SPMD tests under real mpiexec: the collective tests with 2 and 4 ranks (one
rank: the launcher-free run in cli/test_docs_commands.py),
DistLearn's ported uneven-ending tests with 2, 4 and 5, AllReduceDiLoCo against a serial
simulation with 2 and 3 (of 4), the async server's protocol
against scripted workers with 4, and whole training runs of 2 to 5 ranks in one job of 5
(tests/mpi/spmd_runs.py). The 4- and 5-rank jobs use a sub-communicator with the ranks in
reverse order (tests/mpi/comm.py), so nothing may assume COMM_WORLD; the training runs
each get a Split of their own."""

from __future__ import annotations

import pytest
from conftest import spmd

pytestmark = pytest.mark.launch

COLLECTIVES = "tests/mpi/spmd_collectives.py"
SEED = "tests/mpi/spmd_seed.py"
SERVER = "tests/mpi/spmd_server.py"  # the parameter server against scripted workers: 4 ranks exactly
DILOCO = "tests/mpi/spmd_diloco.py"  # AllReduceDiLoCo against a serial simulation: 2 ranks, and 3 of 4
RUNS = "tests/mpi/spmd_runs.py"  # whole runs through mpi_easgd.train.run, without a launch each: 5 ranks exactly


@pytest.mark.parametrize(("ranks", "files"), [(2, [COLLECTIVES, SEED, DILOCO]),
                                              (4, [COLLECTIVES, SEED, SERVER, DILOCO]), (5, [RUNS, SEED])])
def test_spmd(ranks, files):
    spmd(ranks, *files, env={"MPI_EASGD_TEST_COMM": "reversed"} if ranks >= 4 else None)
