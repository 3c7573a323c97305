"""Training throughput of ``--algo sgd`` against PyTorch DDP (gloo), side by side.

Both train the same model on the same data shard with the same batch size per rank,
through the same loader and the same minimal timed loop, in alternating epochs in one
process; the step for ours is the one ``python -m mpi_easgd.train --algo sgd`` runs
(``sync.Peer.step``), without and with ``overlap=True`` (reductions started during
backward). "alone" is the same step with no communication at all (each rank trains on
its own): alone / DDP is the most any data-parallel step could gain over DDP here.
Prints samples/s of each and the median ratios over the rounds (each round runs the four
in turn, the order reversed every other round). Run::

    mpiexec -n 2 python -m mpi4py benchmarks/sgd_vs_ddp.py [--models lenet resnet20] [--pairs 5]
"""

from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from mpi4py import MPI
from torch import nn

from mpi_easgd import AllReduceSGD
from mpi_easgd.data import ShardLoader, read_info, resolve_dataset, write_dataset
from mpi_easgd.models import build_model
from mpi_easgd.runtime.loop import supervised_step

SHAPES = {"lenet": "mnist5k", "resnet20": (3, 32, 32), "cifarnet": (3, 32, 32), "convmlp": (3, 32, 32)}


def dataset(name: str, comm: MPI.Comm, tmp: str) -> Path:
    source = SHAPES[name]
    if isinstance(source, str):
        return resolve_dataset(source)
    path = Path(tmp) / f"random-{'x'.join(map(str, source))}.h5"
    if comm.rank == 0:  # random pixels: throughput does not depend on content
        rng = np.random.default_rng(0)
        split = lambda n: (rng.integers(0, 256, (n, *source), dtype=np.uint8), rng.integers(0, 10, n))  # noqa: E731
        write_dataset(path, split(2048), split(256), 10, "random")
    comm.Barrier()
    return path


def timed_epoch(step, batches, steps: int) -> tuple[int, float]:
    """(samples, seconds) of ``steps`` calls of ``step`` (the loss is summed on the device,
    as the training loop does, so that no step waits for it)."""
    start, samples, total = time.perf_counter(), 0, torch.zeros(())
    for _, batch in zip(range(steps), batches):
        total += step(batch).detach()
        samples += len(batch[1])
    float(total)
    return samples, time.perf_counter() - start


def ratios(rates: dict[str, list[float]], a: str, b: str) -> list[float]:
    """``a`` / ``b`` for each round."""
    return [x / y for x, y in zip(rates[a], rates[b])]


def ours_step(comm: MPI.Comm, name: str, info, overlap: bool):
    """The sgd step of ``mpi_easgd.collectives.peer.Peer``, with or without overlap."""
    torch.manual_seed(0)
    model = build_model(name, info.shape, info.num_classes)
    sgd = AllReduceSGD(comm, overlap=overlap)
    sgd.synchronize_parameters(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    fb = supervised_step(model, sgd.flat(model).zero_grad)

    def step(batch):
        loss = fb(batch)
        sgd.sum_and_normalize_gradients(model)
        opt.step()
        return loss

    return step


def measure(comm: MPI.Comm, name: str, path: Path, args) -> dict[str, list[float]]:
    """Samples/s of ours and of DDP in alternating epochs (the first pair is warm-up)."""
    info = read_info(path)
    loader = ShardLoader(info, "train", comm.rank, comm.size, batch_size=args.batch_size)
    steps = args.steps or loader.steps
    steps_of = {"ours": ours_step(comm, name, info, overlap=False),
                "overlap": ours_step(comm, name, info, overlap=True)}
    torch.manual_seed(0)
    ddp_model = nn.parallel.DistributedDataParallel(build_model(name, info.shape, info.num_classes))
    ddp_opt = torch.optim.SGD(ddp_model.parameters(), lr=0.01)
    ddp_fb = supervised_step(ddp_model, ddp_opt.zero_grad)

    def ddp(batch):
        loss = ddp_fb(batch)
        ddp_opt.step()
        return loss

    steps_of["ddp"] = ddp
    torch.manual_seed(0)
    alone_model = build_model(name, info.shape, info.num_classes)
    alone_opt = torch.optim.SGD(alone_model.parameters(), lr=0.01)
    alone_fb = supervised_step(alone_model, lambda: alone_opt.zero_grad(set_to_none=False))

    def alone(batch):  # no communication: the ceiling of any data-parallel step
        loss = alone_fb(batch)
        alone_opt.step()
        return loss

    steps_of["alone"] = alone
    rates = {key: [] for key in steps_of}
    for pair in range(args.pairs + 1):
        order = list(steps_of.items())[:: 1 if pair % 2 else -1]
        for key, step in order:
            comm.Barrier()
            samples, seconds = timed_epoch(step, loader.epoch(pair), steps)
            seconds = comm.allreduce(seconds, op=MPI.MAX)
            if pair:
                rates[key].append(comm.allreduce(samples) / seconds)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["lenet", "resnet20"])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=0, help="steps per timed epoch (0: a shard)")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    torch.set_num_threads(1)
    tmp = comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None)  # one folder for all ranks
    # Meet at a file, not a TCP port (a port found free may be taken before gloo binds it).
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=comm.rank, world_size=comm.size)
    try:
        if comm.rank == 0:
            print(f"{comm.size} ranks, batch {args.batch_size} per rank, 1 thread per rank")
            print(f"{'model':<10}{'ours samples/s':>16}{'overlapped':>12}{'DDP samples/s':>16}{'alone':>10}"
                  f"{'ours/DDP':>10}{'overlapped/DDP':>16}{'overlapped/ours':>17}{'alone/DDP':>11}"
                  f"  ours/DDP per round")
        for name in args.models:
            rates = measure(comm, name, dataset(name, comm, tmp), args)
            ratio = functools.partial(ratios, rates)
            med = {key: statistics.median(v) for key, v in rates.items()}
            if comm.rank == 0:
                print(f"{name:<10}{med['ours']:>16,.0f}{med['overlap']:>12,.0f}{med['ddp']:>16,.0f}"
                      f"{med['alone']:>10,.0f}{statistics.median(ratio('ours', 'ddp')):>10.3f}"
                      f"{statistics.median(ratio('overlap', 'ddp')):>16.3f}"
                      f"{statistics.median(ratio('overlap', 'ours')):>17.3f}"
                      f"{statistics.median(ratio('alone', 'ddp')):>11.3f}  "
                      f"{' '.join(f'{r:.2f}' for r in ratio('ours', 'ddp'))}")
                sys.stdout.flush()
    finally:
        comm.Barrier()
        if comm.rank == 0:
            shutil.rmtree(tmp)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
