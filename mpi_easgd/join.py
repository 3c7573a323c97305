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
import json
import os
import socket
import sys
import time
from pathlib import Path

import mpi_easgd  # noqa: F401 - applies the pre-MPI-init settings
from mpi_easgd.runtime import ft


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpi_easgd.join", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="the run directory of an async run started with --accept-joiners")
    parser.add_argument("--wait", type=float, default=60.0,
                        help="seconds to wait for the run to open its door (it does once its server starts)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    deadline = time.monotonic() + args.wait
    while not (run_dir / "join.json").exists() and not (run_dir / "summary.json").exists() and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    error = door_problem(run_dir)
    if error:
        print(f"mpi_easgd: error: {error}", file=sys.stderr)
        return 2
    door = json.loads((Path(args.run_dir) / "join.json").read_text())
    setup = door["setup"]
    os.chdir(setup["cwd"])
    from mpi_easgd.ps.join import prepare

    prepared = prepare(setup)  # (before connecting: the first exchange follows the connection at once)
    from mpi4py import MPI

    from mpi_easgd.ps.protocol import Tag, receive_object

    with socket.create_connection((door["host"], door["port"])) as connection:
        inter = MPI.Comm.Join(connection.fileno())
    live = inter.Dup()  # (every worker's liveness channel)
    assignment = receive_object(inter, 0, Tag.JOIN)[1]
    if assignment is None:
        print("mpi_easgd: the run is ending; this worker is not needed", file=sys.stderr)
        live.Disconnect()
        inter.Disconnect()
        return 0
    _train(inter, live, setup, prepared, assignment)
    return 0


def door_problem(run_dir: Path) -> str | None:
    """Why ``run_dir`` cannot be joined (None: it can)."""
    door = run_dir / "join.json"
    if not run_dir.is_dir():
        return f"{run_dir} is not a run directory; pass the RUN_DIR the run printed"
    if not door.is_file():
        return (f"{run_dir} takes no joiners: start the async run with --accept-joiners (a joiner joins while "
                f"the run trains, not after it ended)")
    record = json.loads(door.read_text())
    if record["host"] == socket.gethostname():
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return f"{run_dir}'s rank 0 (pid {record['pid']}) is gone: the run ended without closing its door"
        except PermissionError:
            pass
    return None


def _train(inter, live, setup: dict, prepared, assignment: dict) -> None:
    from mpi_easgd.data import shard_loader, steps_per_epoch
    from mpi_easgd.ps.api import AsyncTraining
    from mpi_easgd.ps.protocol import Tag
    from mpi_easgd.ps.roles import worker_optimizer
    from mpi_easgd.runtime.context import RunContext
    from mpi_easgd.runtime.control import StopRequest
    from mpi_easgd.runtime.loop import train
    from mpi_easgd.runtime.metrics import NullRunLog
    from mpi_easgd.topology import Topology
    from mpi_easgd.transfer import MPIBuffer

    cfg, info, device, flat = prepared
    rank = assignment["rank"]
    transfer = "direct" if device.type == "cpu" else "staged"
    start = MPIBuffer(flat.data, transfer)
    inter.Recv(start.mpi, source=0, tag=Tag.START)
    start.after_recv()
    topo = Topology.build(setup["world_size"], rank, cfg.algo, cfg.servers)  # (a worker with no shard of its own)
    ctx = RunContext(cfg, inter, topo, info, device, NullRunLog(), Path(setup["run_dir"]), StopRequest().install(),
                     None, transfer, time.perf_counter(), identity=rank)
    model = flat.module
    run = AsyncTraining.from_context(ctx, model, worker_optimizer(ctx, model), None, cfg.batch_size,
                                     info.sizes["train"], info.name,
                                     replacing=dict(live=live, position=dict(epoch=assignment["epoch"], step=0)))
    # Each epoch a random share of the whole training set, one worker's shard long.
    share = max(steps_per_epoch(info.sizes["train"], topo.num_workers, cfg.batch_size, not cfg.uneven))
    loader = shard_loader(info, "train", 0, 1, batch_size=cfg.batch_size, seed=cfg.seed + 1 + assignment["joiner"],
                          augment=cfg.augment, prefetch=cfg.prefetch)
    try:
        run.stopped = train(run.worker, loader, run.position, cfg, steps=min(share, loader.steps), rank=rank,
                            device=device, log=NullRunLog())
    except BaseException:
        run.close()
        raise
    run.finish()


if __name__ == "__main__":
    sys.exit(ft.finalize_at_exit(main()))
