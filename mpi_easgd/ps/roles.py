"""The command line's asynchronous run (EASGD, EAMSGD, DOWNPOUR, async DiLoCo, a user's
rule): one user of :class:`~mpi_easgd.ps.api.AsyncTraining`.

Every rank builds the model the flags name (the server's initial parameters become the
center and every worker's starting point); a worker gets the local optimizer and trains
its shard of the dataset (HDF5, built-in, or a user's factory) with the package's training
loop (:func:`mpi_easgd.runtime.loop.train`), which drives the same :class:`AsyncWorker`
as ``AsyncTraining.step``; the tester evaluates the center for the run's task
(:func:`~mpi_easgd.ps.tester.task_evaluator`). Everything else (the server, the
tester's loop, checkpoints, statistics, the summary, worker loss) is the API's.

There is no collective after the start, so a worker dropped under ``--on-worker-loss
continue`` holds nothing up; the tester then ends the job (and the dropped rank with it)
once the summary is written. Under ULFM a worker that died is simply gone; with
``--on-worker-loss respawn`` a replacement (:mod:`mpi_easgd.ps.join`) takes over its rank.
Every worker's statistics reach the tester through the server; a tester that died leaves
the final evaluation and the summary to rank 0, which builds the evaluator too.
"""

from __future__ import annotations

import torch

from mpi_easgd import registry
from mpi_easgd.data import shard_loader
from mpi_easgd.data.rest import Resharded
from mpi_easgd.models import build_model
from mpi_easgd.ps.api import AsyncTraining, evaluations_before
from mpi_easgd.ps.tester import task_evaluator
from mpi_easgd.runtime.context import RunContext
from mpi_easgd.runtime.loop import make_optimizer, train
from mpi_easgd.runtime.metrics import NullRunLog
from mpi_easgd.tasks import task


def run_async(ctx: RunContext) -> None:
    """Run this rank's role to the end (the tester writes the summary)."""
    cfg, topo, info = ctx.cfg, ctx.topo, ctx.info
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, info.shape, info.num_classes).to(ctx.device)
    evaluate = None
    if topo.role == "tester" or topo.rank == topo.server_rank:  # (rank 0 evaluates the end if the tester died)
        evaluations = evaluations_before(ctx.resume) if ctx.resume else 0
        test = shard_loader(info, "test", batch_size=512, shuffle=False, even=False)
        train_data = shard_loader(info, "train", batch_size=cfg.batch_size, seed=cfg.seed)
        evaluate = task_evaluator(task(cfg.task), test, train_data, ctx.device, evaluations)
    run = AsyncTraining.from_context(ctx, model, worker_optimizer(ctx, model), evaluate, cfg.batch_size,
                                     info.sizes["train"], info.name)
    work(run.ctx, run)  # (a worker's death at the start renumbers the ranks: the run's context is another)


def worker_optimizer(ctx: RunContext, model: torch.nn.Module) -> torch.optim.Optimizer | None:
    """The local optimizer the flags name, on a worker."""
    if ctx.topo.role != "worker":
        return None
    return make_optimizer(ctx.cfg, model, nesterov=registry.lookup(ctx.cfg.algo).nesterov)


def work(ctx: RunContext, run: AsyncTraining) -> None:
    """A worker trains its shard with the package's loop; then every role finishes."""
    if run.trains:
        cfg, topo = ctx.cfg, ctx.topo
        loader = Resharded(shard_loader(ctx.info, "train", topo.worker_index, topo.num_workers,
                                        batch_size=cfg.batch_size, seed=cfg.seed, even=not cfg.uneven,
                                        augment=cfg.augment, prefetch=cfg.prefetch), run.rest, topo.worker_index)
        try:
            run.stopped = train(run.worker, loader, run.position, cfg, steps=loader.steps, rank=topo.rank,
                                device=ctx.device, log=NullRunLog())
        except BaseException:
            run.close()
            raise
    run.finish()
