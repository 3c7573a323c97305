"""The emulated network link of ``MPI_EASGD_FAULT`` (``action=delay``), in this process."""

from __future__ import annotations

import time

import pytest

from mpi_easgd.runtime import faults


def test_a_link_is_latency_plus_bytes_over_bandwidth():
    env = {faults.ENV: "rank=1,action=delay,seconds=0.002,mbps=40;rank=2,action=delay,seconds=0.015"}
    link = faults.emulated_link(1, env)
    assert link.seconds(0) == pytest.approx(0.002)
    assert link.seconds(5_000_000) == pytest.approx(0.002 + 1.0)  # 40 Mbit: 5 MB a second
    assert faults.emulated_link(2, env).seconds(10**9) == pytest.approx(0.015), "no mbps: latency only"
    assert faults.emulated_link(0, env) is None
    assert faults.from_env(1, env) is None, "a link is no fault"


def test_waiting_on_a_link_counts_from_the_start():
    link = faults.Link(0.0, mbps=8.0)  # a megabyte a second
    started = time.perf_counter()
    link.wait(started, 50_000)
    assert time.perf_counter() - started >= 0.05
    begun = time.perf_counter()
    link.wait(started - 1.0, 50_000)  # landed long ago: no wait
    assert time.perf_counter() - begun < 0.01


def test_a_fault_at_save_waits_for_that_checkpoint():
    from mpi_easgd.runtime.faults import InjectedFault, from_env

    (fault,) = from_env(2, {"MPI_EASGD_FAULT": "rank=2,action=raise,step=10,at=save"})
    fault.at_step(10)  # not in a step
    faults = from_env(2, {"MPI_EASGD_FAULT": "rank=2,action=raise,step=10,at=save"})
    faults.at("save", 5)  # not in that checkpoint
    faults.at("sync", 10)  # not a checkpoint
    with pytest.raises(InjectedFault, match="in the checkpoint of step 10"):
        faults.at("save", 10)
    with pytest.raises(ValueError, match="at must be one of step, save, sync, eval, end, shrink, final"):
        from_env(2, {"MPI_EASGD_FAULT": "rank=2,action=kill,at=exchange"})


@pytest.mark.parametrize("moment,number,said", [("sync", 2, "in the synchronize ending epoch 2"),
                                                ("eval", 2, "in the evaluation ending epoch 2"),
                                                ("end", 7, "at the end of the run"),
                                                ("shrink", 1, "while another death was handled")])
def test_a_fault_at_another_moment_acts_there_only(moment, number, said):
    from mpi_easgd.runtime.faults import MOMENTS, InjectedFault, from_env

    faults = from_env(2, {"MPI_EASGD_FAULT": f"rank=2,action=raise,step=2,at={moment}"})
    for step in range(5):
        faults.at_step(step)  # never in a step
    for other in MOMENTS[1:]:
        if other != moment:
            faults.at(other, number)
    if moment in ("sync", "eval"):
        faults.at(moment, 3)  # another epoch's end
    with pytest.raises(InjectedFault, match=said):
        faults.at(moment, number)
