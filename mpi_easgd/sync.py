"""The ``peer`` role: synchronous training with AllReduceSGD or AllReduceEA on every rank.

Every rank trains on its own shard and evaluates on its own slice of the test set; the
evaluation sums are Allreduced, so every rank knows the metrics and one rank logs them.
"""

from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

from mpi_easgd import faults
from mpi_easgd.algorithms.allreduce_ea import AllReduceEA
from mpi_easgd.algorithms.allreduce_sgd import AllReduceSGD
from mpi_easgd.config import Config
from mpi_easgd.data import DatasetInfo, ShardLoader, steps_per_epoch
from mpi_easgd.loop import evaluate, make_optimizer, run_epoch, supervised_step
from mpi_easgd.models import build_model


def run_peer(cfg: Config, comm: MPI.Comm, info: DatasetInfo, device: torch.device, log) -> dict:
    """Train for ``cfg.epochs`` epochs; returns the run summary (identical on every rank)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, info.shape, info.num_classes).to(device)
    optimizer = make_optimizer(cfg, model)
    even = not cfg.uneven
    train = ShardLoader(info, "train", rank, size, batch_size=cfg.batch_size, seed=cfg.seed, even=even,
                        augment=cfg.augment, prefetch=cfg.prefetch)
    test = ShardLoader(info, "test", rank, size, batch_size=512, shuffle=False, even=False)
    steps = max(steps_per_epoch(info.sizes["train"], size, cfg.batch_size, even))

    if cfg.algo == "sgd":
        algo = AllReduceSGD(comm)
        algo.synchronize_parameters(model)
        flat = algo.flat(model)
        forward_backward = supervised_step(model, flat.zero_grad)

        def step(batch):
            loss = forward_backward(batch) if batch is not None else None
            algo.sum_and_normalize_gradients(model, has_data=batch is not None)
            optimizer.step()
            return loss

        def end_epoch():
            algo.synchronize_parameters(model)

        def eval_params():
            return None  # the (identical) parameters themselves
    else:
        algo = AllReduceEA(comm, cfg.tau, cfg.alpha)
        algo.synchronize_parameters(model)
        flat = algo.flat(model)
        forward_backward = supervised_step(model, flat.zero_grad)

        def step(batch):
            loss = None
            if batch is not None:
                loss = forward_backward(batch)
                optimizer.step()
            algo.average_parameters(model)
            return loss

        def end_epoch():
            algo.synchronize_center(model)

        def eval_params():
            return algo.center  # EASGD's answer is the center variable

    step = faults.wrap_step(step, rank)
    log.info(
        f"{cfg.algo}: {size} ranks, model {cfg.model} ({flat.numel:,} parameters), "
        f"{info.name} {info.sizes['train']} train / {info.sizes['test']} test, "
        f"batch {cfg.batch_size} per rank, {steps} steps per epoch, device {device}"
    )
    totals = np.zeros(3)  # train samples (all ranks), train seconds (max), loss
    last = {}
    for epoch in range(cfg.epochs):
        bar = log.progress(steps, f"epoch {epoch + 1}/{cfg.epochs}")
        stats = run_epoch(step, train.epoch(epoch), steps, bar, device)
        bar.close()
        end_epoch()
        loss, correct, count = _evaluate_params(model, flat, eval_params(), test, device)
        sums = np.array([loss, correct, count, stats.loss_sum, stats.batches, stats.samples])
        comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
        seconds = comm.allreduce(stats.seconds, op=MPI.MAX)
        totals += (sums[5], seconds, 0)
        last = dict(
            epoch=epoch + 1, step=(epoch + 1) * steps, samples=int(totals[0]),
            train_loss=sums[3] / max(sums[4], 1), test_loss=sums[0] / sums[2],
            test_accuracy=sums[1] / sums[2],
        )
        log.log_eval(**last)
    return dict(
        algo=cfg.algo, model=cfg.model, dataset=info.name, world_size=size, workers=size,
        epochs=cfg.epochs, test_accuracy=last["test_accuracy"], test_loss=last["test_loss"],
        train_samples=int(totals[0]), train_seconds=totals[1],
        train_samples_per_second=totals[0] / totals[1] if totals[1] else 0.0,
        **({"tau": cfg.tau, "alpha": cfg.alpha, "beta": cfg.alpha * size, "rounds": algo.rounds}
           if cfg.algo == "ea" else {}),
    )


def _evaluate_params(model, flat, params, test: ShardLoader, device):
    """Evaluate ``model`` with ``params`` swapped in (if given), then restore its own."""
    if params is None:
        return evaluate(model, test.epoch(0), device)
    own = flat.data.clone()
    flat.data.copy_(params)
    try:
        return evaluate(model, test.epoch(0), device)
    finally:
        flat.data.copy_(own)
