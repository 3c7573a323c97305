"""``python -m mpi_easgd.ps.join``: a spare worker, started by the async server with MPI Spawn
(``--on-worker-loss respawn``; see :mod:`mpi_easgd.ps.spares`).

It starts MPI first (the server waits for that, and only that), then prepares everything
a worker needs from the run's set-up, waits to be assigned a dead worker's rank, takes the
center and trains as that worker: its shard, its checkpoint file, its exchange count, from
the position those exchanges reached. Its statistics go to the server, which is the only
rank it knows. Assigned the tester's place instead, it evaluates the snapshots the server
sends it from then on and writes the run's metrics rows (after the dead tester's) and its
summary. Told it is not needed, it exits.

On a node with more ranks than cores, the spare prepares at a lower priority (nice 10; at
its normal one it took the CPU from the workers that train: 0.73 of the failure-free
exchange rate with a death every 5 s), and goes back to its own when assigned. Not idle
priority: ranks that busy-wait in MPI calls starved such a spare, and the run's end,
which waits for it, with it.
"""

from __future__ import annotations

import os
import sys

import mpi_easgd  # noqa: F401 - applies the pre-MPI-init settings
from mpi_easgd.ps.protocol import Tag, receive_object  # (no torch: MPI starts here, at once)
from mpi_easgd.runtime import ft


def main() -> int:
    from mpi4py import MPI  # (started already, by the protocol's import: the server's Spawn returns now)

    parent = MPI.Comm.Get_parent()
    if parent == MPI.COMM_NULL:
        print("mpi_easgd: error: python -m mpi_easgd.ps.join is started by the async server "
              "(--on-worker-loss respawn), not by hand", file=sys.stderr)
        return 2
    live, setup, lowered = spare_setup(parent)
    os.chdir(setup["cwd"])
    prepared = prepare(setup)
    assignment = wait_for_assignment(parent, lowered)
    if assignment is not None:
        _replace(parent, live, setup, prepared, assignment)  # (which disconnects at its end)
    else:
        live.Disconnect()
        parent.Disconnect()
    return 0


def spare_setup(parent) -> tuple[object, dict, bool]:
    """A spare's first steps, once MPI has started: its liveness channel (every worker has
    one; the server made its side right after Spawn), the run's set-up, and a lower
    priority on a crowded node (whether it took it)."""
    live = parent.Dup()
    setup = parent.recv(source=0, tag=Tag.JOIN)
    return live, setup, setup["crowded"] and _lower_priority()


def wait_for_assignment(parent, lowered: bool) -> dict | None:
    """Wait, off the CPU and as long as it takes, to be assigned a dead worker's place
    (None: not needed); back to this process's own priority when assigned."""
    assignment = receive_object(parent, 0, Tag.JOIN)[1]
    if assignment is not None and lowered:
        _own_priority()
    return assignment


def position_of(exchanges: int, tau: int, steps_per_epoch: int | None) -> dict:
    """Where a worker that made ``exchanges`` had got to: it exchanged at every
    ``tau``-th step (the first at step 0)."""
    t = max(exchanges - 1, 0) * tau
    epoch, step = divmod(t, steps_per_epoch) if steps_per_epoch else (0, t)
    return dict(epoch=epoch, step=step, t=t, exchanges=exchanges)


NICE = 10


def _lower_priority() -> bool:
    """Take the CPU only when the ranks that train leave some; whether it did."""
    try:
        os.nice(NICE)
    except OSError:
        return False
    return True


def _own_priority() -> None:
    try:
        os.nice(-NICE)
    except PermissionError:  # an unprivileged process may not be allowed back
        print(f"mpi_easgd: warning: this replacement worker cannot leave the lower priority it prepared at "
              f"(nice {NICE}, on an oversubscribed node); it trains slower when the CPU is busy",
              file=sys.stderr, flush=True)


def prepare(setup: dict):
    """Everything that takes time, done while the spare waits (or before a late joiner
    connects): torch, the model, the dataset."""
    import torch

    from mpi_easgd.config import Config
    from mpi_easgd.data import open_dataset
    from mpi_easgd.flat import FlatParameters
    from mpi_easgd.models import build_model
    from mpi_easgd.transfer import place

    cfg = Config(**setup["config"])
    torch.set_num_threads(cfg.threads or 1)
    info = open_dataset(cfg.dataset)
    device = torch.device(place(cfg.device, "worker", 0, 1, torch.cuda.device_count()
                                if cfg.device != "cpu" else 0).device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, info.shape, info.num_classes).to(device)
    flat = FlatParameters(model)
    import torch._dynamo  # noqa: F401 - the optimizers' first-use import (1.8 s), paid while waiting

    # A first forward and backward (autograd's set-up), also paid while waiting.
    model(torch.zeros(2, *info.shape, device=device)).sum().backward()
    flat.zero_grad()
    return cfg, info, device, flat


def _replace(parent, live, setup: dict, prepared, assignment: dict) -> None:
    import time
    from pathlib import Path

    from mpi_easgd.data import shard_loader
    from mpi_easgd.ps.api import AsyncTraining
    from mpi_easgd.ps.roles import work, worker_optimizer
    from mpi_easgd.runtime.context import RunContext
    from mpi_easgd.runtime.control import StopRequest
    from mpi_easgd.runtime.faults import GENERATION_ENV
    from mpi_easgd.runtime.metrics import NullRunLog
    from mpi_easgd.topology import Topology
    from mpi_easgd.transfer import MPIBuffer

    cfg, info, device, flat = prepared
    os.environ[GENERATION_ENV] = str(assignment["generation"])  # which injected faults apply to it
    if assignment.get("role") == "tester":
        _test_in_place(parent, live, setup, prepared, assignment)
        return
    rank, exchanges = assignment["rank"], assignment["exchanges"]
    start = MPIBuffer(flat.data, "staged" if device.type != "cpu" else "direct")
    parent.Recv(start.mpi, source=0, tag=Tag.START)
    start.after_recv()
    topo = Topology.build(setup["world_size"], rank, cfg.algo, cfg.servers)
    # Where the dead worker's exchanges had taken it (it exchanged at every tau-th step).
    steps = shard_loader(info, "train", topo.worker_index, topo.num_workers, batch_size=cfg.batch_size,
                        seed=cfg.seed, even=not cfg.uneven).steps
    position = position_of(exchanges, cfg.tau, steps)
    ctx = RunContext(cfg, parent, topo, info, device, NullRunLog(), Path(setup["run_dir"]), StopRequest().install(),
                     None, "direct" if device.type == "cpu" else "staged", time.perf_counter(), identity=rank)
    model = flat.module
    run = AsyncTraining.from_context(ctx, model, worker_optimizer(ctx, model), None, cfg.batch_size,
                                     info.sizes["train"], info.name, replacing=dict(live=live, position=position))
    work(ctx, run)


def _test_in_place(parent, live, setup: dict, prepared, assignment: dict) -> None:
    """Stand in for the tester that died: evaluate every snapshot from now on, then write
    the run's summary (:meth:`AsyncTraining.finish`, on the server's intercommunicator)."""
    from mpi_easgd.data import shard_loader
    from mpi_easgd.ps.api import AsyncTraining
    from mpi_easgd.ps.newcomers import tester_context
    from mpi_easgd.ps.tester import task_evaluator
    from mpi_easgd.tasks import task

    cfg, info, device, flat = prepared
    test = shard_loader(info, "test", batch_size=512, shuffle=False, even=False)
    train = shard_loader(info, "train", batch_size=cfg.batch_size, seed=cfg.seed)
    evaluate = task_evaluator(task(cfg.task), test, train, device, assignment["evaluations"])
    ctx = tester_context(parent, setup, assignment, info, device)
    run = AsyncTraining.from_context(ctx, flat.module, None, evaluate, cfg.batch_size, info.sizes["train"], info.name,
                                     replacing=dict(live=live, evaluations=assignment["evaluations"]))
    run.finish()


if __name__ == "__main__":
    sys.exit(ft.finalize_at_exit(main()))
