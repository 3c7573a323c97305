"""Is the input pipeline fast enough that the model is the bottleneck?

For each model: samples/s the loader produces (in memory, and streamed from HDF5 in
blocks) against samples/s one training step consumes (forward, backward, SGD step, 1
thread), measured alternately; prints the ratio input / consumption (target >= 5). Run::

    python benchmarks/input_pipeline.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mpi_easgd.data import ShardLoader, read_info, resolve_dataset, write_dataset
from mpi_easgd.models import build_model
from mpi_easgd.runtime.loop import supervised_step

BATCH = 128


def produce(loader: ShardLoader, epoch: int) -> float:
    start, n = time.perf_counter(), 0
    for _, y in loader.epoch(epoch):
        n += len(y)
    return n / (time.perf_counter() - start)


def consume(model, batches) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    step = supervised_step(model, opt.zero_grad)
    start = time.perf_counter()
    for batch in batches:
        step(batch)
        opt.step()
    return sum(len(y) for _, y in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description="input pipeline vs training consumption")
    parser.add_argument("--samples", type=int, default=20000, help="size of the CIFAR-shaped set")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        cifar = Path(tmp) / "cifar-shaped.h5"
        split = lambda n: (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n))  # noqa: E731
        write_dataset(cifar, split(args.samples), split(1000), 10, "random")
        cases = [("lenet", resolve_dataset("mnist5k"), False, 8), ("resnet20", cifar, True, 2)]
        print(f"batch {BATCH}, 1 thread; samples/s (median of {args.repeats}); ratio = input / consumption")
        print(f"{'model':<10}{'augment':>8}{'consumes':>10}{'in memory':>11}{'ratio':>7}"
              f"{'streamed':>10}{'ratio':>7}")
        for name, path, augment, steps in cases:
            info = read_info(path)
            mem = ShardLoader(info, "train", batch_size=BATCH, augment=augment)
            stream = ShardLoader(info, "train", batch_size=BATCH, augment=augment, memory_limit=0)
            model = build_model(name, info.shape, info.num_classes)
            batches = [b for b, _ in zip(mem.epoch(0), range(steps))]
            rates = {"consume": [], "memory": [], "stream": []}
            for epoch in range(args.repeats):
                rates["consume"].append(consume(model, batches))
                rates["memory"].append(produce(mem, epoch))
                rates["stream"].append(produce(stream, epoch))
            c, m, s = (statistics.median(rates[k]) for k in ("consume", "memory", "stream"))
            print(f"{name:<10}{augment!s:>8}{c:>10,.0f}{m:>11,.0f}{m / c:>7.1f}{s:>10,.0f}{s / c:>7.1f}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
