"""``python -m mpi_easgd.join RUN_DIR``: one more worker for a running async run.

The run must have been started with ``--accept-joiners``: its rank 0 then listens on a
port and says where in ``RUN_DIR/join.json`` (:mod:`mpi_easgd.ps.joiners`). This
process prepares everything first (torch, the model, the dataset), then connects, gets
the current center and trains from the epoch the run has reached to ``--epochs``,
each epoch a random share of the training set as large as one worker's shard, exchanging
with the server as every worker does; it counts in the run's summary. Start it with the
run's MPI: ``mpiexec -n 1 python -m mpi_easgd.join RUN_DIR`` (MPICH joins two jobs
started apart; Open MPI only inside one DVM, ``prte`` then ``prun``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import mpi_easgd  # noqa: F401 - applies the pre-MPI-init settings
from mpi_easgd.runtime import ft


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpi_easgd.join", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="the run directory of an async run started with --accept-joiners")
    parser.add_argument("--wait", type=float, default=60.0,
                        help="seconds to wait for the run to open its door (it does once its server starts)")
    args = parser.parse_args(argv)
    from mpi_easgd.ps.joiners import JoinRefused, read_door

    try:
        door = read_door(Path(args.run_dir), args.wait)
    except JoinRefused as exc:
        print(f"mpi_easgd: error: {exc}", file=sys.stderr)
        return 2
    setup = door["setup"]
    os.chdir(setup["cwd"])
    from mpi_easgd.ps.join import prepare

    prepared = prepare(setup)  # (before connecting: the first exchange follows the connection at once)
    _train(Path(args.run_dir), door, prepared)
    return 0


def _train(run_dir: Path, door: dict, prepared) -> None:
    """Join (:meth:`AsyncTraining.join`) and train with the package's loop, each epoch a
    random share of the whole training set, one worker's shard long."""
    from mpi_easgd import registry
    from mpi_easgd.data import shard_loader, steps_per_epoch
    from mpi_easgd.ps.api import AsyncTraining
    from mpi_easgd.runtime.loop import make_optimizer, train
    from mpi_easgd.runtime.metrics import NullRunLog

    cfg, info, device, flat = prepared
    model = flat.module
    optimizer = make_optimizer(cfg, model, nesterov=registry.lookup(cfg.algo).nesterov)
    run = AsyncTraining.join(run_dir, model, optimizer, samples_per_step=cfg.batch_size,
                             samples_per_epoch=info.sizes["train"], door=door)
    topo = run.ctx.topo
    share = max(steps_per_epoch(info.sizes["train"], topo.num_workers, cfg.batch_size, not cfg.uneven))
    loader = shard_loader(info, "train", 0, 1, batch_size=cfg.batch_size, seed=cfg.seed + 1 + run.joiner,
                          augment=cfg.augment, prefetch=cfg.prefetch)
    try:
        run.stopped = train(run.worker, loader, run.position, cfg, steps=min(share, loader.steps), rank=topo.rank,
                            device=device, log=NullRunLog())
    except BaseException:
        run.close()
        raise
    run.finish()


if __name__ == "__main__":
    sys.exit(ft.finalize_at_exit(main()))
