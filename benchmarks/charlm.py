"""Every algorithm on the character-level language model, side by side: the built-in
``pystdlib`` corpus (the standard library's own source bytes), the built-in ``charlm``
model, ``--task next-token``, the same samples for each (whole epochs over the training
set, by 4 ranks that train: sync runs have 4 peers, async runs 4 workers plus a server and
a tester). Prints validation loss (nats per byte), perplexity and wall time per algorithm,
beside the unigram baseline (predicting every byte by its frequency in the test set)::

    python benchmarks/charlm.py                 # sgd, ea, diloco, easgd, async-diloco; 1 epoch
    python benchmarks/charlm.py --algos diloco async-diloco --outer-momentum 0.5
    python benchmarks/charlm.py --algos diloco --outer-momentum 0.5 --formats float32 int4 topk
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import mpiexec  # noqa: E402

from mpi_easgd.data import open_dataset  # noqa: E402
from mpi_easgd.registry import lookup  # noqa: E402


def unigram(test) -> float:
    """Nats per byte of predicting every byte of ``test`` by its frequency there."""
    counts = torch.bincount(test.tokens, minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algos", nargs="+", default=["sgd", "ea", "diloco", "easgd", "async-diloco"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--workers", type=int, default=4, help="ranks that train")
    parser.add_argument("--tau", type=int, default=10)
    parser.add_argument("--outer-momentum", type=float, default=0.9, help="diloco, async-diloco")
    parser.add_argument("--formats", nargs="+", default=["float32"], help="--exchange-dtype of each run (not sgd)")
    args = parser.parse_args()
    baseline = unigram(open_dataset("pystdlib").datasets["test"])
    print(f"pystdlib, charlm, {args.workers} ranks training, {args.epochs} epoch(s), tau {args.tau}, "
          f"outer momentum {args.outer_momentum}; "
          f"unigram baseline {baseline:.3f} nats/byte (perplexity {torch.tensor(baseline).exp():.2f})")
    print(f"{'algo':<14}{'format':<9}{'ranks':>6}{'samples':>9}{'test loss':>11}{'perplexity':>12}{'accuracy':>10}"
          f"{'wall s':>9}{'loss/unigram':>14}")
    with tempfile.TemporaryDirectory() as out:
        for algo, fmt in [(a, f) for a in args.algos for f in (["float32"] if a == "sgd" else args.formats)]:
            ranks = args.workers + 2 * lookup(algo).is_async
            name = f"{algo}-{fmt}"
            cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi_easgd.train", "--algo", algo,
                   "--model", "charlm", "--dataset", "pystdlib", "--task", "next-token", "--optimizer", "adamw",
                   "--lr", "0.003", "--batch-size", "32", "--tau", str(args.tau), "--epochs", str(args.epochs),
                   "--outer-momentum", str(args.outer_momentum), "--test-every", "20", "--no-progress",
                   "--out", out, "--run-name", name, *(["--exchange-dtype", fmt] if algo != "sgd" else [])]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode:
                print(f"{name}: failed\n{result.stderr[-2000:]}")
                continue
            s = json.loads((Path(out) / name / "summary.json").read_text())
            loss = s["test_loss"]
            print(f"{algo:<14}{fmt:<9}{ranks:>6}{s['train_samples']:>9}{loss:>11.3f}{torch.tensor(loss).exp():>12.2f}"
                  f"{s['test_accuracy']:>10.3f}{s['wall_seconds']:>9.1f}{loss / baseline:>14.3f}", flush=True)

if __name__ == "__main__":
    main()
