"""The ``peer`` role: synchronous training with AllReduceSGD or AllReduceEA on every rank.

Every rank trains on its own shard and evaluates on its own slice of the test set; the
evaluation sums are Allreduced, so every rank knows the metrics and one rank logs them.
Checkpoints hold every rank's own state (EA ranks differ); a resumed run continues from
the saved step with the same batches and ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from mpi_easgd import checkpoint, faults
from mpi_easgd.algorithms.allreduce_ea import AllReduceEA
from mpi_easgd.algorithms.allreduce_sgd import AllReduceSGD
from mpi_easgd.config import Config
from mpi_easgd.control import Control, Preempted
from mpi_easgd.data import DatasetInfo, ShardLoader, steps_per_epoch
from mpi_easgd.loop import (
    EpochStats,
    NonFiniteError,
    evaluate,
    finite,
    make_optimizer,
    nonfinite_note,
    run_epoch,
    supervised_step,
)
from mpi_easgd.metrics import run_summary
from mpi_easgd.models import build_model


def run_peer(cfg: Config, comm: MPI.Comm, info: DatasetInfo, device: torch.device, log,
             run_dir: Path, control: Control, resume: Path | None, transfer: str = "auto",
             started: float | None = None) -> dict:
    """Train for ``cfg.epochs`` epochs; returns the run summary (identical on every rank).
    ``started``: the ``time.perf_counter()`` origin of the run's wall clock (saved in checkpoints)."""
    started = time.perf_counter() if started is None else started
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, info.shape, info.num_classes).to(device)
    optimizer = make_optimizer(cfg, model)
    even = not cfg.uneven
    train = ShardLoader(info, "train", rank, size, batch_size=cfg.batch_size, seed=cfg.seed, even=even,
                        augment=cfg.augment, prefetch=cfg.prefetch)
    test = ShardLoader(info, "test", rank, size, batch_size=512, shuffle=False, even=False)
    steps = max(steps_per_epoch(info.sizes["train"], size, cfg.batch_size, even))
    # A rank that hangs or dies mid-collective ends the job after --worker-timeout.
    guard = dict(transfer=transfer, timeout=cfg.worker_timeout, on_timeout="abort")
    if cfg.algo == "sgd":
        algo = AllReduceSGD(comm, **guard)
    else:
        algo = AllReduceEA(comm, cfg.tau, cfg.alpha, **guard)
    algo.synchronize_parameters(model)
    flat = algo.flat(model)
    forward_backward = supervised_step(model, flat.zero_grad)
    skipped = 0

    def local_step(batch) -> torch.Tensor | None:
        """Forward and backward; None when this rank has no usable gradient this step."""
        nonlocal skipped
        if batch is None:
            return None
        loss = forward_backward(batch)
        if finite(loss, flat.grad):
            return loss
        if cfg.on_nonfinite == "stop":
            raise NonFiniteError(f"non-finite loss or gradient on rank {rank}; lower --lr or run "
                                 f"with --on-nonfinite skip")
        skipped += 1
        return None  # skipped: contributes nothing, so the NaN reaches no other rank

    if cfg.algo == "sgd":
        def step(batch):
            loss = local_step(batch)
            if algo.sum_and_normalize_gradients(model, has_data=loss is not None):
                optimizer.step()  # no rank steps when no rank had a usable gradient
            return loss

        def end_epoch():
            algo.synchronize_parameters(model)
    else:
        def step(batch):
            loss = local_step(batch)
            if loss is not None:
                optimizer.step()
            algo.average_parameters(model)
            return loss

        def end_epoch():
            algo.synchronize_center(model)

    step = faults.wrap_step(step, rank)
    position = {"epoch": 0, "step": 0, "stats": EpochStats(), "totals": [0.0, 0.0]}
    if resume is not None:
        position = _restore(checkpoint.load_rank(resume, rank), model, optimizer, algo)
        skipped = position["skipped"]
        control.schedule.mark(position["epoch"] * steps + position["step"], time.monotonic())
        log.info(f"resumed from {resume} at epoch {position['epoch'] + 1}, step {position['step']}")
    log.info(
        f"{cfg.algo}: {size} ranks, model {cfg.model} ({flat.numel:,} parameters), "
        f"{info.name} {info.sizes['train']} train / {info.sizes['test']} test, "
        f"batch {cfg.batch_size} per rank, {steps} steps per epoch, device {device}"
    )
    totals = np.array(position["totals"])  # train samples (all ranks), train seconds
    last = {}

    def save(epoch: int, next_step: int, stats: EpochStats, finished: bool = False) -> Path:
        ckpt = checkpoint.step_dir(run_dir, epoch * steps + next_step)
        state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                     algorithm=algo.state_dict(), epoch=epoch, step=next_step,
                     stats=dataclasses.asdict(stats), totals=totals.tolist(), skipped=skipped,
                     torch_rng=torch.get_rng_state())
        written = checkpoint.try_save_rank(ckpt, rank, state)
        # Every rank's file is on disk before the checkpoint is marked complete; if one is
        # not, every write is over before the incomplete checkpoint is removed.
        if not comm.allreduce(written, op=MPI.LAND):
            if rank == 0:
                checkpoint.discard(ckpt)
            comm.Barrier()
            raise checkpoint.CheckpointFailed(ckpt)
        if rank == 0:
            checkpoint.commit(run_dir, ckpt, dict(config=dataclasses.asdict(cfg), world_size=size,
                                                  epoch=epoch, step=next_step, finished=finished,
                                                  wall_seconds=time.perf_counter() - started))
        return ckpt

    for epoch in range(position["epoch"], cfg.epochs):
        start = position["step"] if epoch == position["epoch"] else 0
        stats = position["stats"] if epoch == position["epoch"] else EpochStats()
        bar = log.progress(steps, f"epoch {epoch + 1}/{cfg.epochs}")
        bar.update(start)

        def after_step(i: int, stats: EpochStats, epoch=epoch) -> None:
            save_now, stop = control.poll(epoch * steps + i + 1)
            if save_now:
                ckpt = save(epoch, i + 1, stats)
                if stop:
                    raise Preempted(ckpt)

        stats = run_epoch(step, train.epoch(epoch, start), steps, bar, device, start=start,
                          stats=stats, after_step=after_step)
        bar.close()
        end_epoch()
        loss, correct, count = _evaluate(model, flat, getattr(algo, "center", None), test, device)
        sums = np.array([loss, correct, count, stats.loss_sum, stats.batches, stats.samples])
        comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
        totals += (sums[5], comm.allreduce(stats.seconds, op=MPI.MAX))
        last = dict(
            epoch=epoch + 1, step=(epoch + 1) * steps, samples=int(totals[0]),
            train_loss=sums[3] / max(sums[4], 1), test_loss=sums[0] / sums[2],
            test_accuracy=sums[1] / sums[2],
        )
        log.log_eval(**last)
    if position["epoch"] < cfg.epochs:  # not when resumed from the final checkpoint itself
        save(cfg.epochs, 0, EpochStats(), finished=True)  # the final state, resumable with more --epochs
        if rank == 0:  # the model that was evaluated last (ea: the center), for use outside a checkpoint
            with swapped_in(flat, getattr(algo, "center", None)):
                checkpoint.save_model(model, run_dir / "model.pt")
    skipped = comm.allreduce(skipped)
    note = nonfinite_note(skipped, cfg.epochs * steps * size)
    if note:
        log.warn(note)
    return run_summary(cfg, info.name, size, size, test=last, train_samples=int(totals[0]), train_seconds=totals[1],
                       nonfinite_skipped=skipped, resumed_from=str(resume) if resume else None,
                       **({"rounds": algo.rounds} if cfg.algo == "ea" else {}))


def _restore(state: dict, model, optimizer, algo) -> dict:
    model.load_state_dict(state["model"])  # copies into the flat buffer's views
    optimizer.load_state_dict(state["optimizer"])
    algo.load_state_dict(state["algorithm"])
    torch.set_rng_state(state["torch_rng"])
    return dict(epoch=state["epoch"], step=state["step"], stats=EpochStats(**state["stats"]),
                totals=state["totals"], skipped=state.get("skipped", 0))


@contextlib.contextmanager
def swapped_in(flat, params: torch.Tensor | None):
    """The model holds ``params`` (if given) inside the block, its own parameters after it."""
    if params is None:
        yield
        return
    own = flat.data.clone()
    flat.data.copy_(params)
    try:
        yield
    finally:
        flat.data.copy_(own)


def _evaluate(model, flat, params, test: ShardLoader, device):
    """Evaluate ``model`` with ``params`` swapped in (if given)."""
    with swapped_in(flat, params):
        return evaluate(model, test.epoch(0), device)
