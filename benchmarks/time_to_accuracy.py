"""Time-to-accuracy on mnist5k for every algorithm, optionally with a straggler.

Runs ``mpiexec -n RANKS python -m mpi_easgd.train`` for each algorithm (each elastic,
outer or async one at every tau, and at every exchange dtype), then writes
``time_to_accuracy.csv`` (wall time and samples to reach the target test accuracy, final
accuracy, bytes per exchange) and ``time_to_accuracy.png`` (test accuracy against wall time
and samples, one line per run) into OUT.

``--ranks N`` gives every algorithm N ranks (async: 2 of them are the server and the
tester); ``--workers W`` gives every algorithm W training ranks instead (async: W + 2 ranks).

``--straggler F`` emulates workers with an accelerator each: every worker sleeps
``--step-ms`` per training step (the machine's cores are shared by all ranks, so real
compute alone would not show whose step is slow) and the last worker sleeps F times as
long: one worker F times slower than the others (``--straggler 1``: equal workers).

``--exchange-delay-ms D`` emulates a network with a round trip of D ms between the async
workers and the server (every reply lands D ms after its send at the earliest), and
``--overlap-modes off on`` runs every async algorithm with the blocking exchange and with
``--overlap-exchange``, side by side. Run::

    python benchmarks/time_to_accuracy.py [--ranks 4 | --workers 4] [--taus 10 64] [--target 0.95]
        [--algos sgd easgd] [--exchange-dtypes float32 float16] [--straggler 3 --step-ms 20] [--out tta]
        [--exchange-delay-ms 50 --overlap-modes off on]
        [any python -m mpi_easgd.train flag, for every run]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import mpiexec  # noqa: E402

from mpi_easgd.models import build_model  # noqa: E402
from mpi_easgd.plot import plot  # noqa: E402
from mpi_easgd.registry import ASYNC_NAMES as ASYNC_ALGOS  # noqa: E402
from mpi_easgd.registry import NAMES  # noqa: E402
from mpi_easgd.runtime.faults import ENV as FAULT_ENV  # noqa: E402

ALGOS = list(NAMES)
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def layout(algo: str, args) -> tuple[int, list[int]]:
    """(ranks, worker ranks) of one run."""
    if args.workers:
        ranks = args.workers + 2 * (algo in ASYNC_ALGOS)
    else:
        ranks = args.ranks
    return ranks, list(range(1, ranks - 1)) if algo in ASYNC_ALGOS else list(range(ranks))


def delays(workers: list[int], step_ms: float, factor: float, exchange_ms: float = 0.0) -> str:
    """``$MPI_EASGD_FAULT``: with ``factor``, every worker sleeps step_ms per step, the last
    factor times as long; with ``exchange_ms``, every exchange takes that long at least."""
    specs = [f"rank={r},action=sleep,seconds={step_ms / 1e3 * (factor if r == workers[-1] else 1):g}"
             for r in workers] if factor else []
    specs += [f"rank={r},action=delay,seconds={exchange_ms / 1e3:g}" for r in workers] if exchange_ms else []
    return ";".join(specs)


def main() -> None:
    parser = argparse.ArgumentParser()
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--ranks", type=int, default=4)
    size.add_argument("--workers", type=int, default=0)
    parser.add_argument("--taus", type=int, nargs="+", default=[10, 64])
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("tta"))
    parser.add_argument("--algos", nargs="+", default=ALGOS, choices=ALGOS)
    parser.add_argument("--exchange-dtypes", nargs="+", default=["float32"], choices=list(BYTES))
    parser.add_argument("--straggler", type=float, default=0.0, help="the last worker is F times slower (0: none)")
    parser.add_argument("--step-ms", type=float, default=20.0, help="emulated compute per step with --straggler")
    parser.add_argument("--exchange-delay-ms", type=float, default=0.0,
                        help="emulated network round trip of every async exchange (0: none)")
    parser.add_argument("--overlap-modes", nargs="+", default=["off"], choices=["off", "on"],
                        help="async algorithms: blocking exchange (off), --overlap-exchange (on), or both")
    args, extra = parser.parse_known_args()  # the others go to every run (e.g. --lr 0.025)
    numel = sum(p.numel() for p in build_model("lenet", (1, 28, 28), 10).parameters())
    runs = [(a, None, "float32", "off") for a in args.algos if a == "sgd"]
    runs += [(a, t, d, o) for t in args.taus for d in args.exchange_dtypes for a in args.algos if a != "sgd"
             for o in (args.overlap_modes if a in ASYNC_ALGOS else ["off"])]
    rows, dirs = [], []
    for algo, tau, dtype, overlap in runs:
        name = algo + (f"-tau{tau}" if tau else "") + (f"-{dtype}" if len(args.exchange_dtypes) > 1 else "")
        name += "-overlap" if overlap == "on" else ""
        ranks, workers = layout(algo, args)
        flags = ["--algo", algo, "--epochs", str(args.epochs), "--test-every", "0.5", "--no-progress",
                 "--out", str(args.out), "--run-name", name] + (["--tau", str(tau)] if tau else [])
        flags += (["--exchange-dtype", dtype] if dtype != "float32" else []) + extra
        flags += ["--overlap-exchange"] if overlap == "on" else []
        faults = delays(workers, args.step_ms, args.straggler, args.exchange_delay_ms if algo in ASYNC_ALGOS else 0)
        env = dict(os.environ, **({FAULT_ENV: faults} if faults else {}))
        r = subprocess.run([mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi_easgd.train", *flags],
                           capture_output=True, text=True, env=env)
        if r.returncode:
            print(f"{name}: failed\n{r.stderr}", file=sys.stderr)
            continue
        run_dir = args.out / name
        dirs.append(run_dir)
        metrics = list(csv.DictReader((run_dir / "metrics.csv").open()))
        hit = next((m for m in metrics if float(m["test_accuracy"]) >= args.target), None)
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append(dict(
            algo=algo, tau=tau or "", exchange_dtype=dtype, overlap=overlap, ranks=ranks, workers=summary["workers"],
            straggler=args.straggler or "", exchange_delay_ms=args.exchange_delay_ms or "",
            exchange_wait_seconds=round(max((w.get("exchange_wait_seconds", 0) for w in summary.get("per_worker", [])),
                                            default=0), 2),
            seconds_to_target=float(hit["wall_time"]) if hit else "",
            samples_to_target=int(hit["samples"]) if hit else "",
            final_accuracy=summary["test_accuracy"], wall_seconds=round(summary["wall_seconds"], 2),
            samples_per_second=round(summary["train_samples_per_second"]),
            bytes_per_exchange=numel * BYTES[dtype] if algo != "sgd" else numel * 4,
        ))
        print(", ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    with (args.out / "time_to_accuracy.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    who = f"{args.workers} workers" if args.workers else f"{args.ranks} ranks"
    slow = f", one worker {args.straggler:g}x slower" if args.straggler and args.straggler != 1 else ""
    slow += f", {args.exchange_delay_ms:g} ms exchange round trip" if args.exchange_delay_ms else ""
    title = f"mnist5k, {who}{slow}: time to {args.target:.2f} test accuracy"
    plot(dirs, args.out / "time_to_accuracy.png", title=title)
    print(f"wrote {args.out / 'time_to_accuracy.csv'} and {args.out / 'time_to_accuracy.png'}")


if __name__ == "__main__":
    main()
