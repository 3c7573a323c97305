"""HierarchicalAveraging's levels, checked before any communicator is made (the averaging
itself runs under mpiexec against torch's HierarchicalModelAverager in
tests/mpi/spmd_collectives.py)."""

import pytest

from mpi_easgd.collectives.hierarchical import check_levels


def test_levels_in_order_are_kept():
    assert check_levels({2: 2, 4: 4, 8: 8}, 8) == [(2, 2), (4, 4), (8, 8)]
    assert check_levels({4: "node", 16: 64}, 64) == [(4, "node"), (16, 64)]


@pytest.mark.parametrize(("levels", "says"), [
    ({}, "at least one period"),
    ({0: 8}, "period must be an integer >= 1"),
    ({2: 3, 4: 8}, "divides 8"),
    ({4: 2, 2: 8}, "periods must increase"),
    ({2: 4, 4: 2, 8: 8}, "groups must grow"),
    ({2: 2, 4: 4}, "last level must average every rank: its group must be 8"),
])
def test_bad_levels_say_what_is_wrong(levels, says):
    with pytest.raises(ValueError, match=says):
        check_levels(levels, 8)
