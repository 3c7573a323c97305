"""Time-to-accuracy on mnist5k for every algorithm at the same number of ranks and tau.

Runs ``mpiexec -n RANKS python -m mpi_easgd.train`` for sgd, ea, easgd, eamsgd and downpour
(each elastic/async one at every tau), then writes ``time_to_accuracy.csv`` (wall time and
samples to reach the target test accuracy, final accuracy) and ``time_to_accuracy.png``
(test accuracy against wall time and samples, one line per run) into OUT. Run::

    python benchmarks/time_to_accuracy.py [--ranks 4] [--taus 10 64] [--target 0.95] [--out tta] [--algos sgd easgd]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from mpi_easgd.plot import plot


def mpiexec() -> str:
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else "mpiexec"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--taus", type=int, nargs="+", default=[10, 64])
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("tta"))
    parser.add_argument("--algos", nargs="+", default=["sgd", "ea", "easgd", "eamsgd", "downpour"])
    args = parser.parse_args()
    runs = [("sgd", None)] * ("sgd" in args.algos) + [(a, t) for t in args.taus for a in args.algos if a != "sgd"]
    rows, dirs = [], []
    for algo, tau in runs:
        name = f"{algo}" + (f"-tau{tau}" if tau else "")
        flags = ["--algo", algo, "--epochs", str(args.epochs), "--test-every", "0.5", "--no-progress",
                 "--out", str(args.out), "--run-name", name] + (["--tau", str(tau)] if tau else [])
        r = subprocess.run([mpiexec(), "-n", str(args.ranks), sys.executable, "-m", "mpi_easgd.train", *flags],
                           capture_output=True, text=True)
        if r.returncode:
            print(f"{name}: failed\n{r.stderr}", file=sys.stderr)
            continue
        run_dir = args.out / name
        dirs.append(run_dir)
        metrics = list(csv.DictReader((run_dir / "metrics.csv").open()))
        hit = next((m for m in metrics if float(m["test_accuracy"]) >= args.target), None)
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append(dict(
            algo=algo, tau=tau or "", ranks=args.ranks, workers=summary["workers"],
            seconds_to_target=float(hit["wall_time"]) if hit else "",
            samples_to_target=int(hit["samples"]) if hit else "",
            final_accuracy=summary["test_accuracy"], wall_seconds=round(summary["wall_seconds"], 2),
            samples_per_second=round(summary["train_samples_per_second"]),
        ))
        print(", ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    with (args.out / "time_to_accuracy.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(dirs, args.out / "time_to_accuracy.png",
         title=f"mnist5k, {args.ranks} ranks: time to {args.target:.2f} test accuracy")
    print(f"wrote {args.out / 'time_to_accuracy.csv'} and {args.out / 'time_to_accuracy.png'}")


if __name__ == "__main__":
    main()
