"""What exchanges below 16 bits cost and keep, side by side in one run.

1. The codecs alone (this process, one torch thread): bytes against float32, and encode and
   decode speed in GB/s of float32 input per core, at 11 M parameters.
2. Whole runs on mnist5k, the same samples for each (whole epochs): for each algorithm and
   format, the final test accuracy over several seeds (mean and spread), the bytes one
   exchange sends against float32's, and the bytes all training ranks sent in the whole run
   against synchronous SGD's (float32 gradient Allreduces, the same seeds and epochs)::

    python benchmarks/compression.py                          # diloco, async-diloco; float32, int4, topk
    python benchmarks/compression.py --algos ea easgd --formats float32 int8 --seeds 0 --epochs 3
    python benchmarks/compression.py --algos async-diloco --formats float32 topk --outer-momentum 0.5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import mpiexec  # noqa: E402

from mpi_easgd import compress  # noqa: E402
from mpi_easgd.registry import lookup  # noqa: E402


def codecs(n: int = 11_000_000) -> None:
    torch.set_num_threads(1)
    x = torch.randn(n)
    out = torch.empty(n)
    print(f"codecs at {n:,} parameters, 1 torch thread (GB/s of float32 input)")
    print(f"{'format':<8}{'bytes/float32':>15}{'encode GB/s':>13}{'decode GB/s':>13}")
    for name in ("int8", "int4", "topk"):
        codec = compress.codec(name)
        buf = compress.message_buffer(codec, n)
        codec.encode(x, buf)  # warm: scratch buffers
        times = {}
        for what, fn in (("encode", lambda c=codec, b=buf: c.encode(x, b)),
                         ("decode", lambda c=codec, b=buf: c.decode(b, out))):
            start = time.perf_counter()
            for _ in range(3):
                fn()
            times[what] = 4 * n * 3 / (time.perf_counter() - start) / 1e9
        print(f"{name:<8}{codec.nbytes(n) / (4 * n):>15.4f}{times['encode']:>13.2f}{times['decode']:>13.2f}")


def run(algo: str, fmt: str, seed: int, args, out: str) -> dict:
    ranks = args.workers + 2 * lookup(algo).is_async
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi_easgd.train", "--algo", algo,
           "--epochs", str(args.epochs), "--tau", str(args.tau), "--seed", str(seed), "--no-progress",
           *(["--outer-momentum", str(args.outer_momentum)] if lookup(algo).outer else []),
           "--out", out, "--run-name", f"{algo}-{fmt}-{seed}"]
    if fmt != "float32":
        cmd += ["--exchange-dtype", fmt]
    if fmt == "topk":
        cmd += ["--topk-fraction", str(args.topk_fraction)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    return json.loads((Path(out) / f"{algo}-{fmt}-{seed}" / "summary.json").read_text())


def per_exchange(summary: dict) -> int:
    return summary.get("bytes_sent_per_exchange", summary.get("bytes_sent_per_round"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algos", nargs="+", default=["diloco", "async-diloco"])
    parser.add_argument("--formats", nargs="+", default=["float32", "int4", "topk"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--tau", type=int, default=10)
    parser.add_argument("--workers", type=int, default=4, help="ranks that train")
    parser.add_argument("--outer-momentum", type=float, default=0.9, help="diloco, async-diloco")
    parser.add_argument("--topk-fraction", type=float, default=0.02)
    parser.add_argument("--no-codecs", action="store_true", help="skip part 1")
    args = parser.parse_args()
    if not args.no_codecs:
        codecs()
        print()
    print(f"mnist5k, lenet, {args.workers} ranks training, {args.epochs} epochs, tau {args.tau}, "
          f"outer momentum {args.outer_momentum}, top-k fraction {args.topk_fraction}, "
          f"seeds {args.seeds}; bytes: what every training rank handed MPI to send")
    print(f"{'algo':<14}{'format':<9}{'accuracy mean':>14}{'spread':>8}{'vs float32':>11}"
          f"{'bytes/exchange':>16}{'vs float32':>11}{'run bytes vs sgd':>18}")
    with tempfile.TemporaryDirectory() as out:
        sgd = {seed: run("sgd", "float32", seed, args, out)["bytes_sent"] for seed in args.seeds}
        for algo in args.algos:
            base_acc = base_bytes = None
            for fmt in args.formats:
                runs = [run(algo, fmt, seed, args, out) for seed in args.seeds]
                accs = [r["test_accuracy"] for r in runs]
                mean, spread = statistics.mean(accs), max(accs) - min(accs)
                size = per_exchange(runs[0])
                if fmt == "float32":
                    base_acc, base_bytes = mean, size
                vs_sgd = statistics.mean(r["bytes_sent"] / sgd[s] for r, s in zip(runs, args.seeds))
                print(f"{algo:<14}{fmt:<9}{mean:>14.4f}{spread:>8.4f}"
                      f"{(mean - base_acc) * 100 if base_acc is not None else 0:>+10.2f}p"
                      f"{size:>16,}{size / base_bytes if base_bytes else 1:>11.4f}{vs_sgd:>18.5f}", flush=True)


if __name__ == "__main__":
    main()
