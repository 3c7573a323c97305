"""Every algorithm over one emulated slow link, side by side: compute utilization and time
to a target accuracy.

Each training rank's exchanges land no sooner than ``latency + bytes / bandwidth`` after
they started (``MPI_EASGD_FAULT`` ``action=delay,seconds=L,mbps=B``, a sleep, as a real
link's wait would be: :mod:`mpi_easgd.runtime.faults`). The default link (2 ms, 40 Mbit/s)
makes one float32 DiLoCo round of LeNet (247 KB through each rank's link) take longer than
its ``tau`` local steps on this kind of machine. The same samples for each run (whole epochs
of mnist5k); sync runs have ``--ranks`` peers, async runs as many workers plus a server and
a tester. Prints, per run: compute utilization (the summary's definition: the share of
training wall time not blocked in an exchange), bytes one exchange sends, wall seconds to
the first evaluation at or above ``--target``, final accuracy::

    python benchmarks/slow_link.py
    python benchmarks/slow_link.py --mbps 20 --ranks 2 --epochs 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import mpiexec  # noqa: E402

from mpi_easgd.registry import lookup  # noqa: E402

STREAMING = ["--fragments", "2", "--overlap-steps", "4", "--mixing", "0.5"]
RUNS = [  # (label, algo, flags)
    ("sgd", "sgd", []),
    ("diloco float32", "diloco", []),
    ("diloco int4", "diloco", ["--exchange-dtype", "int4"]),
    ("streaming float32", "diloco", STREAMING),
    ("streaming int4", "diloco", [*STREAMING, "--exchange-dtype", "int4"]),
    ("easgd float32", "easgd", []),
    ("easgd int4 overlapped", "easgd", ["--exchange-dtype", "int4", "--overlap-exchange"]),
    ("async-diloco float32", "async-diloco", []),
    ("async-diloco int4 overl.", "async-diloco", ["--exchange-dtype", "int4", "--overlap-exchange"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency", type=float, default=0.002, help="seconds per exchange")
    parser.add_argument("--mbps", type=float, default=40.0, help="megabits per second")
    parser.add_argument("--ranks", type=int, default=2, help="ranks that train")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--tau", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.9, help="test accuracy")
    parser.add_argument("--only", nargs="*", help="labels to run (default: all)")
    args = parser.parse_args()
    print(f"emulated link: {args.latency * 1e3:g} ms + bytes / {args.mbps:g} Mbit/s per exchange; mnist5k, lenet, "
          f"{args.ranks} ranks training, {args.epochs} epochs, tau {args.tau}; target accuracy {args.target}")
    print(f"{'run':<26}{'utilization':>12}{'bytes/exchange':>16}{'s to target':>13}{'wall s':>8}{'accuracy':>10}")
    with tempfile.TemporaryDirectory() as out:
        for label, algo, flags in RUNS:
            if args.only and label not in args.only:
                continue
            ranks = args.ranks + 2 * lookup(algo).is_async
            link = ";".join(f"rank={r},action=delay,seconds={args.latency},mbps={args.mbps}" for r in range(ranks))
            name = label.replace(" ", "-").replace(".", "")
            cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi_easgd.train", "--algo", algo,
                   "--epochs", str(args.epochs), "--tau", str(args.tau), "--test-every", "0.5", "--no-progress",
                   "--out", out, "--run-name", name, *flags]
            result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MPI_EASGD_FAULT": link})
            if result.returncode:
                sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
            summary = json.loads((Path(out) / name / "summary.json").read_text())
            rows = list(csv.DictReader((Path(out) / name / "metrics.csv").open()))
            reached = next((float(r["wall_time"]) for r in rows if float(r["test_accuracy"]) >= args.target), None)
            size = summary.get("bytes_sent_per_exchange", summary.get("bytes_sent_per_round"))
            print(f"{label:<26}{summary['compute_utilization']:>12.3f}{size:>16,}"
                  f"{reached if reached is not None else float('nan'):>13.2f}{summary['wall_seconds']:>8.2f}"
                  f"{summary['test_accuracy']:>10.4f}", flush=True)


if __name__ == "__main__":
    main()
