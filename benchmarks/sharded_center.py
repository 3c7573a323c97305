"""The center on one server rank against the center split over two (``--servers 2``), on
the same work: async EASGD on mnist5k, 2 workers, the same seeds. Prints each run's final
accuracy, the exchanges per second the runs made, and the mean difference of the two
settings over the seeds (the target: within 0.5 points)::

    python benchmarks/sharded_center.py                       # 3 seeds x 6 epochs, ~2 minutes
    python benchmarks/sharded_center.py --seeds 0 1 2 3 4 --epochs 8

The runs alternate (S = 1, S = 2, S = 1...) so that drift in the machine hits both alike.
On a machine with fewer cores than ranks the second server rank takes CPU from the
workers: exchanges/s is measured, not promised (``benchmarks/server_throughput.py
--servers 2`` measures the server's own rate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import mpiexec  # noqa: E402


def run(servers: int, seed: int, epochs: int, out: Path, extra: list[str]) -> dict:
    name = f"s{servers}-seed{seed}"
    cmd = [mpiexec(), "-n", str(servers + 3), sys.executable, "-m", "mpi_easgd.train", "--algo", "easgd",
           "--dataset", "mnist5k", "--epochs", str(epochs), "--seed", str(seed), "--servers", str(servers),
           "--out", str(out), "--run-name", name, "--no-progress", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / name / "summary.json").read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for every run")
    args = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="sharded_center."))
    acc = {1: [], 2: []}
    rate = {1: [], 2: []}
    print(f"{'seed':>5}{'S':>3}{'test_acc':>10}{'exchanges/s':>13}")
    for seed in args.seeds:
        for servers in ((1, 2) if seed % 2 == 0 else (2, 1)):
            s = run(servers, seed, args.epochs, out, args.extra)
            acc[servers].append(s["test_accuracy"])
            rate[servers].append(s["exchanges"] / s["train_seconds"])
            print(f"{seed:>5}{servers:>3}{acc[servers][-1]:>10.4f}{rate[servers][-1]:>13.1f}", flush=True)
    diffs = [b - a for a, b in zip(acc[1], acc[2])]
    print(f"\nmean test accuracy: S=1 {statistics.mean(acc[1]):.4f}, S=2 {statistics.mean(acc[2]):.4f}; "
          f"S=2 - S=1: {statistics.mean(diffs) * 100:+.2f} points (per seed: "
          + ", ".join(f"{d * 100:+.2f}" for d in diffs) + ")")
    print(f"exchanges/s: S=1 {statistics.mean(rate[1]):.1f}, S=2 {statistics.mean(rate[2]):.1f} "
          f"(ratio {statistics.mean(rate[2]) / statistics.mean(rate[1]):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
