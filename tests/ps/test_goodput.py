"""Goodput's account of worker processes that ended without a report (pure)."""

from __future__ import annotations

from mpi_easgd.ps.stats import dead_generations
from mpi_easgd.runtime.metrics import goodput


def test_each_dead_process_counts_its_exchanges_after_its_first_and_half_an_interval_lost():
    rows = [dict(rank=1, server_exchanges=40, lost=False),  # alive to the end: its own report counts
            dict(rank=2, server_exchanges=30, lost=False),  # died at 12 and at 20 exchanges, replaced twice
            dict(rank=3, server_exchanges=9, lost=True)]  # died (--on-worker-loss continue)
    replacements = [dict(rank=2, exchanges_before=12), dict(rank=2, exchanges_before=20)]
    useful, lost, deaths = dead_generations(rows, replacements, reported={1, 2}, tau=10, samples_per_step=32)
    assert deaths == 3
    assert useful == ((12 - 1) + (20 - 12 - 1) + (9 - 1)) * 10 * 32
    assert lost == 3 * 10 * 32 / 2


def test_goodput_is_useful_over_computed_and_says_what_it_estimated():
    assert goodput(900, 100, 0)["goodput"] == 0.9
    assert "estimated" not in goodput(900, 100, 0)["goodput_is"]
    assert "the 2 dead process(es)' last steps are estimated" in goodput(900, 100, 2)["goodput_is"]
    assert goodput(0, 0, 0)["goodput"] == 1.0
