"""The tester rank: evaluates snapshots of the center while training goes on.

It polls for the next snapshot with a short sleep between polls (it must not busy-wait on
a CPU that workers need), evaluates it with the run's evaluation function (the user's, in
a script: model -> metrics) and logs one metrics row per snapshot. On the FINAL snapshot it
evaluates and returns.

The command line's evaluation (:func:`task_evaluator`): BatchNorm statistics
are not part of the center, so before each evaluation they are re-estimated on a few
training batches (as for any averaged model); ``train_loss`` is the center's loss on a
fixed slice of the training set (the first 1,024 samples): the workers' own losses belong
to their own parameters, not to the model being tested.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpi_easgd.data import ShardLoader, shard_loader
from mpi_easgd.flat import FlatParameters
from mpi_easgd.ps.protocol import META_LEN, Kind, Tag, shard_bounds, wait_politely
from mpi_easgd.ps.stats import TesterStats
from mpi_easgd.runtime import faults
from mpi_easgd.runtime.loop import evaluate
from mpi_easgd.tasks import Task
from mpi_easgd.transfer import MPIBuffer

Evaluate = Callable[[nn.Module], dict[str, float]]  # model -> metrics


@torch.no_grad()
def refresh_batchnorm(model: nn.Module, batches, device: torch.device, limit: int = 20) -> None:
    """Re-estimate BatchNorm running statistics with a cumulative average over ``limit`` batches."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i, (x, _) in enumerate(batches):
        if i == limit:
            break
        model(x.to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def task_evaluator(kind: Task, test: ShardLoader, train: ShardLoader, device: torch.device,
                   evaluations: int = 0) -> Evaluate:
    """The command line's evaluation for its task (classification: an image classifier):
    BatchNorm statistics re-estimated on a few training batches (those of epoch
    ``evaluations``, counting on), then ``train_loss`` on the first 1,024 training samples
    and the task's test metrics (:meth:`~mpi_easgd.tasks.Task.metrics`) on the test set."""
    probe = shard_loader(train.info, "train", batch_size=512, shuffle=False, even=False, prefetch=0)
    evaluations = itertools.count(evaluations)

    def evaluate_task(model: nn.Module) -> dict[str, float]:
        refresh_batchnorm(model, train.epoch(next(evaluations)), device)
        sums = evaluate(model, test.epoch(0), device, kind)
        train_loss, _, train_count = evaluate(model, itertools.islice(probe.epoch(0), 2), device, kind)
        return dict(train_loss=train_loss / train_count, **kind.metrics(*sums))

    return evaluate_task


def run_tester(comm: MPI.Comm, flat: FlatParameters, evaluate_fn: Evaluate, server: int, log,
               transfer: str = "auto", evaluations: int = 0, samples_per_epoch: int | None = None,
               servers: list[int] | None = None, spares: dict[int, MPI.Comm] | None = None) -> TesterStats:
    """Evaluate every snapshot with ``evaluate_fn(model) -> metrics`` until the final one
    (counting on from ``evaluations``, for a resumed run); each row goes to ``log`` with the
    center's version and the samples before it (and the epochs, given
    ``samples_per_epoch``); returns the final evaluation. ``servers``: every server rank
    when the center is split over several (``--servers``; each sends its shard);
    ``spares``: where rank 0 serves a shard whose server died (:mod:`.shards`): the meta
    message says which; a snapshot whose shard server died before sending it is skipped."""
    from mpi_easgd.ps.shards import route
    from mpi_easgd.runtime import ft

    model = flat.module
    meta = np.zeros(META_LEN, dtype=np.int64)
    servers = servers or [server]
    # snapshots land straight in the model's parameters, each shard in its place
    pieces = [(rank, MPIBuffer(flat.data[a:b], transfer))
              for rank, (a, b) in zip(servers, shard_bounds(flat.numel, len(servers)))]
    fault = faults.from_env(comm.Get_rank())
    while True:
        wait_politely([comm.Irecv(meta, source=server, tag=Tag.SNAPSHOT_META)])
        taken_over, whole = int(meta[3]), True
        for rank, piece in pieces:
            where, source = route(comm, rank, spares or {}, bool(taken_over >> rank & 1))
            with ft.survivable() as death:
                where.Recv(piece.mpi, source=source, tag=Tag.SNAPSHOT)  # already on its way
            # (Open MPI may also end a receive from a dead peer with nothing received and no error)
            whole &= not death and not (where is comm and rank in (spares or {}) and ft.is_dead(comm, rank))
            piece.after_recv()
        kind, updates, samples = (int(v) for v in meta[:3])
        if not whole:  # (its shard server died before it sent its piece)
            if kind == Kind.FINAL:  # evaluated once the whole final center is in center.pt (AsyncTraining._test)
                return TesterStats({}, evaluations, pending=(updates, samples))
            continue
        if fault:
            fault.at_step(evaluations)
        row = evaluation_row(model, evaluate_fn, updates, samples, samples_per_epoch)
        log.log_eval(**row)
        evaluations += 1
        if kind == Kind.FINAL:
            return TesterStats(row, evaluations)


def evaluation_row(model: nn.Module, evaluate_fn: Evaluate, updates: int, samples: int,
                   samples_per_epoch: int | None) -> dict:
    """One metrics row: ``evaluate_fn(model)`` of the center after ``updates`` updates and
    ``samples`` samples (the model's train/eval mode left as it was)."""
    was_training = model.training
    metrics = evaluate_fn(model)
    model.train(was_training)
    epoch = round(samples / samples_per_epoch, 3) if samples_per_epoch else ""
    return dict(epoch=epoch, step=updates, samples=samples, **{k: float(v) for k, v in metrics.items()})
