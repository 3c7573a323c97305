"""The flight recorder's ring and its reading, in-process (the launched test of a real
mismatch is in tests/cli/test_reliability.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from mpi_easgd.runtime import flight


def waiting(rank: int, op: str | None, call: int = 1, where: str = "train.py:10", world: int = 3) -> dict:
    entry = dict(seq=call, op=op, call=call, began=100.0, ended=None, where=where)
    return dict(rank=rank, world_size=world, time=104.0, ring=[entry] if op else [], waiting=[entry] if op else [])


def test_the_ring_keeps_the_last_waits_with_the_callers_line(tmp_path):
    r = flight.Recorder()
    r.folder = tmp_path
    for i in range(flight.RING + 5):
        r.opened(("w", i), "AllReduceEA#1.average_parameters")
        r.closed(("w", i))
    r.opened(("w", "x"), "AllReduceEA#1.synchronize_center")  # still waiting
    path = r.dump("test")
    record = json.loads(path.read_text())
    assert path.name == "rank-00000.json" and record["reason"] == "test"
    assert len(record["ring"]) == flight.RING and record["ring"][-2]["call"] == flight.RING + 5
    assert all(e["ended"] is not None for e in record["ring"][:-1])
    (open_,) = record["waiting"]
    assert open_["op"] == "AllReduceEA#1.synchronize_center" and open_["call"] == 1
    assert open_["where"].startswith(__file__) and open_["ended"] is None  # this test's own line


def test_line_up_names_the_rank_in_another_call():
    rings = {0: waiting(0, "AllReduceSGD#1.sum", 4, "a.py:24"), 1: waiting(1, "AllReduceSGD#1.sum", 3, "a.py:20"),
             2: waiting(2, "AllReduceSGD#1.sum", 4, "a.py:24")}
    rows, verdict = flight.line_up(rings)
    assert len(rows) == 4 and "a.py:20" in rows[2]
    assert verdict == ("first mismatch: rank 1 is in AllReduceSGD#1.sum (call 3) from a.py:20, while ranks 0, 2 "
                       "are in AllReduceSGD#1.sum (call 4) from a.py:24")


def test_line_up_names_a_rank_that_waits_in_nothing_or_wrote_nothing():
    idle = {0: waiting(0, "X#1.f"), 1: waiting(1, None), 2: waiting(2, "X#1.f")}
    assert flight.line_up(idle)[1].startswith("first mismatch: rank 1 made no watched call, while ranks 0, 2")
    gone = {0: waiting(0, "X#1.f"), 2: waiting(2, "X#1.f")}
    rows, verdict = flight.line_up(gone)
    assert "(no record)" in rows[2] and verdict.startswith("first mismatch: rank 1 wrote no record")
    same = {r: waiting(r, "X#1.f") for r in range(3)}
    assert flight.line_up(same)[1] == "every rank is in X#1.f (call 1): no mismatch among them"


def test_the_command_says_when_there_is_nothing_to_read(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mpi_easgd.flight", str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "no flight record (rank-*.json) in" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
