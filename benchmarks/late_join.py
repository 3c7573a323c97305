"""How soon a late joiner exchanges, at 11 M parameters (MPICH).

An async EASGD run (``mpiexec -n 4``: a server, 2 workers, a tester) of a wide MLP on
mnist5k (784-3000-3000-10: 11.4 M parameters, 45.6 MB of float32) accepts joiners; one
``python -m mpi_easgd.join RUN_DIR`` is started beside it (it prepares, then waits for the
door). Printed per round: the seconds from the joiner's connection to its first exchange
applied by the server (the summary's ``seconds_to_first_exchange``: the join, its place,
the 45.6 MB center, a first forward and backward, the exchange), its exchanges, and the
run's accuracy; then the median. The target is under 1 s. Run::

    python benchmarks/late_join.py [--rounds 3] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from torch import nn

HERE = Path(__file__).resolve().parent


def wide(shape, outputs):
    """784-3000-3000-10: 11.4 M parameters."""
    inputs = 1
    for n in shape:
        inputs *= n
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, 3000), nn.ReLU(), nn.Linear(3000, 3000), nn.ReLU(),
                         nn.Linear(3000, outputs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    mpiexec = str(Path(sys.executable).with_name("mpiexec"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    firsts = []
    with tempfile.TemporaryDirectory() as out:
        for r in range(args.rounds):
            name = f"join-{r}"
            run = subprocess.Popen([mpiexec, "-n", "4", sys.executable, "-m", "mpi_easgd.train", "--no-progress",
                                    "--algo", "easgd", "--dataset", "mnist5k", "--model", "late_join:wide",
                                    "--epochs", str(args.epochs), "--accept-joiners", "--out", out,
                                    "--run-name", name], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
            joiner = subprocess.run([mpiexec, "-n", "1", sys.executable, "-m", "mpi_easgd.join",
                                     str(Path(out) / name)], env=env, capture_output=True, text=True, timeout=900)
            stdout, stderr = run.communicate(timeout=900)
            if run.returncode or joiner.returncode:
                sys.exit(f"round {r} failed:\n{stderr[-2000:]}\n{joiner.stderr[-2000:]}")
            summary = json.loads((Path(out) / name / "summary.json").read_text())
            joined = [w for w in summary["per_worker"] if w.get("joined")]
            if not joined:
                sys.exit(f"round {r}: the run ended before the joiner connected; raise --epochs")
            first = joined[0]["seconds_to_first_exchange"]
            firsts.append(first)
            print(f"round {r + 1}: first exchange {first:.3f} s after connecting, {joined[0]['exchanges']} "
                  f"exchanges, accuracy {summary['test_accuracy']:.4f}", flush=True)
    print(f"median: {statistics.median(firsts):.3f} s (target < 1 s)")


if __name__ == "__main__":
    main()
