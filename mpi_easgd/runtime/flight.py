"""A flight recorder of each rank's watched waits, and ``python -m mpi_easgd.flight RUN_DIR``.

Every wait the package watches (a synchronous class's collective call, a worker's exchange
with the server, the server's wait for any message, the tester's for its snapshot: every
:class:`~mpi_easgd.runtime.watchdog.Watchdog` key) is entered in a ring of the last
:data:`RING` on its rank: what it waits in (``AllReduceSGD#1.sum_and_normalize_gradients``:
the class, which of its instances on this rank, the call), the how-manieth such call it
is, when it began and ended, and where it was called from (the first frame outside the
package: the user's line). It costs a dictionary entry and a walk up the stack per call.

When a watchdog finds a wait too long, its rank writes the ring (``flight/rank-R.json`` in
the run directory, else in ``$MPI_EASGD_FLIGHT_DIR`` or ``./mpi_easgd-flight``) before it
says so, and waits :data:`GATHER` seconds before it ends the job, so that the other ranks'
watchdogs, which fire at about the same time, write theirs. ``SIGUSR2`` makes a rank write
its ring at any time (the command line and ``AsyncTraining`` install it;
:func:`install_signal` for a script of your own).

:func:`line_up` reads the rings of a run and names the first mismatch: the rank that waits
in a different call from the others (another call, another instance, or the same call a
different number of times), the rank that waits in nothing watched, or the rank that wrote
nothing (dead, or stuck outside any watched call).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

RING = 64  # entries each rank keeps
GATHER = 2.0  # seconds a rank that ends the job waits, first, for the others to write their rings
FOLDER_ENV = "MPI_EASGD_FLIGHT_DIR"
_PACKAGE = str(Path(__file__).resolve().parent.parent)


class Recorder:
    """One process's ring of watched waits (the module's :data:`RECORDER`)."""

    def __init__(self) -> None:
        self.ring: collections.deque[dict] = collections.deque(maxlen=RING)
        self.calls: collections.Counter[str] = collections.Counter()  # entries per op
        self.open: dict[object, dict] = {}  # (watchdog, key) -> its entry, while it waits
        self.folder: Path | None = None  # where dumps go (None: $MPI_EASGD_FLIGHT_DIR or ./mpi_easgd-flight)
        self.rank, self.world_size = -1, 0  # learnt on the main thread: a watchdog's dump makes no MPI call
        self._lock = threading.Lock()
        self._seq = 0

    def opened(self, key, op: str) -> None:
        """A watched wait ``op`` began (``key`` identifies it until :meth:`closed`)."""
        if self.rank < 0:
            from mpi4py import MPI

            self.rank, self.world_size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
        with self._lock:
            self._seq += 1
            self.calls[op] += 1
            entry = dict(seq=self._seq, op=op, call=self.calls[op], began=time.time(), ended=None,
                         where=_caller())
            self.ring.append(entry)
            self.open[key] = entry

    def closed(self, key) -> None:
        with self._lock:
            entry = self.open.pop(key, None)
            if entry is not None:
                entry["ended"] = time.time()

    def dump(self, reason: str) -> Path | None:
        """Write this rank's ring; the file's path (None if it could not be written). No MPI
        call: a watchdog's thread calls this."""
        rank, size = self.rank, self.world_size
        with self._lock:
            record = dict(rank=rank, world_size=size, host=socket.gethostname(), pid=os.getpid(), reason=reason,
                          time=time.time(), ring=[dict(e) for e in self.ring],
                          waiting=[dict(e) for e in sorted(self.open.values(), key=lambda e: e["seq"])])
        folder = self.folder or Path(os.environ.get(FOLDER_ENV, "mpi_easgd-flight"))
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"rank-{rank:05d}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1))
            tmp.replace(path)  # (a reader never sees half a file)
        except OSError as exc:
            print(f"mpi_easgd: warning: could not write the flight record ({exc})", file=sys.stderr, flush=True)
            return None
        return path


RECORDER = Recorder()


def _caller() -> str:
    """``file:line`` of the first frame outside the package (the user's call), else the outermost."""
    frame, last = sys._getframe(2), None
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_PACKAGE) and not name.startswith("<"):
            return f"{name}:{frame.f_lineno}"
        last, frame = frame, frame.f_back
    return f"{last.f_code.co_filename}:{last.f_lineno}" if last else "?"


def install_signal() -> None:
    """Make ``SIGUSR2`` write this rank's ring (from the main thread)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR2, lambda signum, frame: RECORDER.dump("SIGUSR2"))


# ---- reading the rings -------------------------------------------------------------


def read(folder: Path) -> dict[int, dict]:
    """Every rank's ring in ``folder`` (a run directory or its ``flight`` folder)."""
    folder = Path(folder)
    if (folder / "flight").is_dir():
        folder = folder / "flight"
    rings = {}
    for path in sorted(folder.glob("rank-*.json")):
        record = json.loads(path.read_text())
        rings[int(record["rank"])] = record
    return rings


def _doing(record: dict) -> tuple | None:
    """(op, call number) of the latest wait a rank was in when it wrote its ring."""
    if not record["waiting"]:
        return None
    entry = record["waiting"][-1]
    return entry["op"], entry["call"]


def line_up(rings: dict[int, dict]) -> tuple[list[str], str]:
    """The rings side by side (one line per rank) and the first mismatch, in words."""
    if not rings:
        return [], "no flight record found"
    world = max(max(r["world_size"] for r in rings.values()), max(rings) + 1)
    rows = [f"{'rank':>5}  {'waiting in (call number)':<56} {'for':>7}  called from"]
    for rank in range(world):
        record = rings.get(rank)
        if record is None:
            rows.append(f"{rank:>5}  (no record)")
            continue
        if record["waiting"]:
            e = record["waiting"][-1]
            rows.append(f"{rank:>5}  {e['op'] + ' (' + str(e['call']) + ')':<56} {record['time'] - e['began']:>6.1f}s"
                        f"  {e['where']}")
        else:
            last = record["ring"][-1] if record["ring"] else None
            rows.append(f"{rank:>5}  {'(nothing watched)':<56} {'':>7}  last: "
                        + (f"{last['op']} ({last['call']}) from {last['where']}" if last else "none"))
    doing = {rank: _doing(record) for rank, record in rings.items()}
    counts = collections.Counter(d for d in doing.values() if d is not None)
    missing = [r for r in range(world) if r not in rings]
    if not counts:
        return rows, "no rank was waiting in a watched call when it wrote its record"
    common, _ = counts.most_common(1)[0]
    ranks_common = sorted(r for r, d in doing.items() if d == common)
    odd = sorted(r for r, d in doing.items() if d != common)
    if odd:
        rank = odd[0]
        record = rings[rank]
        if doing[rank] is None:
            last = record["ring"][-1] if record["ring"] else None
            what = (f"rank {rank} waits in no watched call (its last: {last['op']} ({last['call']}) from "
                    f"{last['where']})" if last else f"rank {rank} made no watched call")
        else:
            e = record["waiting"][-1]
            what = f"rank {rank} is in {e['op']} (call {e['call']}) from {e['where']}"
        where = next(e["where"] for e in rings[ranks_common[0]]["waiting"][::-1])
        return rows, (f"first mismatch: {what}, while rank{'s' * (len(ranks_common) > 1)} "
                      f"{', '.join(map(str, ranks_common))} {'are' if len(ranks_common) > 1 else 'is'} in "
                      f"{common[0]} (call {common[1]}) from {where}")
    if missing:
        return rows, (f"first mismatch: rank {missing[0]} wrote no record (it died, or is stuck outside any "
                      f"watched call), while every other rank is in {common[0]} (call {common[1]})")
    return rows, f"every rank is in {common[0]} (call {common[1]}): no mismatch among them"


def main(argv: list[str] | None = None) -> int:
    """``python -m mpi_easgd.flight RUN_DIR``: the rings side by side, and the first mismatch."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m mpi_easgd.flight", description=line_up.__doc__)
    p.add_argument("folder", type=Path, help="a run directory, its flight/ folder, or $MPI_EASGD_FLIGHT_DIR")
    args = p.parse_args(argv)
    rings = read(args.folder)
    if not rings:
        print(f"mpi_easgd.flight: error: no flight record (rank-*.json) in {args.folder}; a rank writes one when a "
              f"watched wait runs past its timeout, or on SIGUSR2", file=sys.stderr)
        return 2
    rows, verdict = line_up(rings)
    print("\n".join(rows))
    print(verdict)
    return 0
