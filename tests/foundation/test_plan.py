"""The cost model (mpi_easgd.plan): its formulas against cases worked by hand, its limits,
and the command line. The calibration itself runs under mpiexec in
tests/mpi/spmd_collectives.py; benchmarks/plan_validation.py compares it with runs."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT

from mpi_easgd import plan

M = plan.Machine(latency=5e-6, bandwidth=12.5e9, reduce=1e-10, server_update=3e-10, worker_update=3e-10,
                 round_overhead={"sgd": 1e-10, "ea": 5e-10, "diloco": 1e-9})


def test_closed_network_is_exact_at_the_limits_and_between_them():
    assert plan.closed_network(1.0, 0.1, 1) == pytest.approx(1 / 1.1)  # alone: no queue
    assert plan.closed_network(1.0, 0.1, 200) == pytest.approx(10.0, rel=1e-6)  # saturated: 1 / demand
    rates = [plan.closed_network(1.0, 0.1, n) for n in range(1, 30)]
    assert all(b >= a for a, b in zip(rates, rates[1:])) and rates[5] < rates[10] <= 10.0
    assert all(x <= min(n / 1.1, 10.0) + 1e-12 for n, x in enumerate(rates, 1))  # under both bounds
    assert plan.closed_network(2.0, 0.0, 4) == 2.0
    # two customers, service of fixed length: the second waits half a service on average
    x = plan.closed_network(1.0, 0.5, 2)
    assert x == pytest.approx(2 / (1.0 + 0.5 * (1 + (1 / 1.5) * 0.5 - (0.5 / 1.5) / 2)))


def test_one_async_worker_waits_for_its_round_trip_and_the_updates():
    w = plan.Workload(params=1_000_000, step_seconds=0.01, tau=4, workers=1)
    p = plan.predict("easgd", w, M)
    msg = 4e6
    cycle = 0.04 + 1e6 * 3e-10 + 2 * 5e-6 + 2 * msg / 12.5e9 + 1e6 * 3e-10
    assert p.exchanges_per_second == pytest.approx(1 / cycle)
    assert p.compute_utilization == pytest.approx(0.04 / cycle)
    assert p.bytes_per_sample == pytest.approx(2 * msg / (4 * 32))
    assert p.bottleneck == "compute"


def test_a_busy_server_limits_the_exchanges_and_shards_lift_the_limit():
    w = plan.Workload(params=11_000_000, step_seconds=0.005, tau=1, workers=64)
    one = plan.predict("easgd", w, M)
    demand = 11e6 * (2 * 4 / 12.5e9 + 3e-10)
    assert one.exchanges_per_second == pytest.approx(1 / demand, rel=0.01) and one.server_busy > 0.99
    assert one.bottleneck == "server link"  # 0.64 ns a parameter on the wire, 0.3 to update
    s = plan.servers_needed(w, M)
    assert plan.predict("easgd", dataclasses.replace(w, servers=s), M).server_busy <= 0.8
    assert plan.predict("easgd", dataclasses.replace(w, servers=s // 2), M).server_busy > 0.8
    slow_update = dataclasses.replace(M, server_update=5e-9)
    assert plan.predict("easgd", w, slow_update).bottleneck == "server arithmetic"
    fast_server = dataclasses.replace(M, bandwidth=1.25e9, server_bandwidth=100e9)  # a slow worker link
    assert plan.predict("easgd", dataclasses.replace(w, workers=2), fast_server).bottleneck == "worker link"


def test_the_bottleneck_is_the_largest_share_of_a_cycle_queueing_included():
    """Two workers whose server is 73% busy wait for it (in all) longer than they compute."""
    w = plan.Workload(params=11_000_000, step_seconds=0.005, tau=2, workers=2)
    p = plan.predict("easgd", w, M)
    assert p.server_busy < 0.8 and p.compute_utilization < 0.5 and p.bottleneck == "server link"


def test_groups_send_one_exchange_per_group_and_pay_for_their_rounds():
    w = plan.Workload(params=1_000_000, step_seconds=0.01, tau=10, workers=8)
    pairs = dataclasses.replace(w, group=2, group_tau=5)
    flat, grouped = plan.predict("easgd", w, M), plan.predict("easgd", pairs, M)
    rounds = 2 * (plan.ring_allreduce(2, 4e6, M) + 1e6 * 1e-10) + (5e-6 + 4e6 / 12.5e9)  # 2 averages, 1 broadcast
    assert plan.grouped(pairs, M) == pytest.approx(rounds)
    alone = plan.predict("easgd", dataclasses.replace(pairs, workers=2), M)  # one group: no queue at the server
    cycle = 0.1 + rounds + 1e6 * 3e-10 + 2 * 5e-6 + 2 * 4e6 / 12.5e9 + 1e6 * 3e-10
    assert alone.exchanges_per_second == pytest.approx(1 / cycle)
    assert alone.samples_per_second == pytest.approx(2 * 10 * 32 / cycle)  # the whole group's samples
    assert grouped.exchanges_per_second < flat.exchanges_per_second and grouped.server_busy < flat.server_busy
    assert grouped.bytes_per_sample == pytest.approx(flat.bytes_per_sample / 2)


def test_ring_formulas_and_the_sync_algorithms():
    assert plan.ring_allreduce(1, 1e6, M) == 0.0
    assert plan.ring_allreduce(4, 4e6, M) == pytest.approx(6 * (5e-6 + 1e6 / 12.5e9) + 0.75 * 4e6 * 1e-10)
    assert plan.ring_allgather(4, 1e6, M) == pytest.approx(3 * (5e-6 + 1e6 / 12.5e9))
    w = plan.Workload(params=1_000_000, step_seconds=0.01, tau=10, workers=8)
    sgd, ea = plan.predict("sgd", w, M), plan.predict("ea", w, M)
    assert sgd.exchanges_per_second == pytest.approx(1 / (0.01 + plan.ring_allreduce(8, 4e6, M) + 1e6 * 1e-10))
    assert ea.compute_utilization == pytest.approx(0.1 / (0.1 + plan.ring_allreduce(8, 4e6, M) + 1e6 * 5e-10))
    assert ea.compute_utilization > sgd.compute_utilization  # one round in ten steps
    int4 = dataclasses.replace(w, wire_bytes=plan.wire_bytes("int4", w.params))
    assert plan.predict("ea", int4, M).bytes_per_sample == pytest.approx(2 * 7 * int4.params * int4.wire_bytes / 320)


def test_wire_bytes_come_from_the_codecs():
    assert plan.wire_bytes("float32") == 4.0 and plan.wire_bytes("bfloat16") == 2.0
    assert plan.wire_bytes("int8") == pytest.approx(1 + 2 / 256, rel=1e-3)
    assert plan.wire_bytes("int4") == pytest.approx(0.5 + 2 / 256, rel=1e-3)
    assert plan.wire_bytes("topk", topk_fraction=0.02) < 0.1


def test_projection_finds_where_one_server_stops_keeping_up():
    w = plan.Workload(params=11_200_000, step_seconds=0.1, tau=10)
    rows = plan.projection(w, M, [4, 64, 512])
    assert rows[0]["servers_needed"] == 1 and rows[-1]["servers_needed"] > 1
    assert rows[-1]["easgd_S1_util"] < 0.5 < rows[-1]["easgd_util"]
    assert all(math.isfinite(r["sgd_util"]) and 0 < r["sgd_util"] < 1 for r in rows)


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpi_easgd.plan", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_command_line_prints_the_table_the_projection_and_the_plot(tmp_path):
    calib = tmp_path / "machine.json"
    calib.write_text(json.dumps(dataclasses.asdict(M)))
    r = run_plan("--calibration", str(calib), "--workers", "4", "--exchange-dtype", "int4",
                 "--plot", str(tmp_path / "plan.png"))
    assert r.returncode == 0, r.stderr
    firsts = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    assert set(plan.ASYNC + plan.SYNC) <= set(firsts), r.stdout  # a row each
    assert "servers_needed" in r.stdout and {"64", "256", "512"} <= set(firsts), r.stdout
    assert (tmp_path / "plan.png").stat().st_size > 10_000


@pytest.mark.parametrize(("args", "says"), [
    (["--workers", "0"], "--workers must be positive"),
    (["--calibration", "/nonexistent/machine.json"], "cannot read the calibration /nonexistent/machine.json"),
])
def test_bad_input_is_one_line(args, says):
    r = run_plan(*args)
    assert r.returncode == 2 or r.returncode == 1, r
    assert says in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
