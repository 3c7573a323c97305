"""How a process that was not in an async run at its start gets in: a spare the server
spawned (``--on-worker-loss respawn``: it stands in for a dead worker or the tester) and a
late joiner (``--accept-joiners``). Each function returns the :class:`RunContext` the
newcomer's :class:`~mpi_easgd.ps.api.AsyncTraining` is set up with (on an
intercommunicator to the server, its only peer) and what its role starts from.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from mpi4py import MPI
from torch import nn

from mpi_easgd.flat import FlatParameters
from mpi_easgd.ps.protocol import Tag
from mpi_easgd.runtime import session
from mpi_easgd.runtime.context import RunContext
from mpi_easgd.transfer import MPIBuffer


def from_spare(parent: MPI.Intercomm, model: nn.Module, samples_per_step: int,
          samples_per_epoch: int | None) -> tuple[RunContext, dict]:
    """A script rerun as a spare (``on_worker_loss="respawn"``): wait to be assigned a dead
    worker's place, take the center, and stand in for that worker from where its exchanges
    had taken it (its epoch from ``samples_per_epoch``, when given). Not needed: the
    process ends here."""
    from mpi_easgd.config import Config
    from mpi_easgd.ps.join import position_of, spare_setup, wait_for_assignment
    from mpi_easgd.runtime.control import StopRequest
    from mpi_easgd.runtime.faults import GENERATION_ENV
    from mpi_easgd.runtime.metrics import NullRunLog
    from mpi_easgd.topology import Topology

    live, setup, lowered = spare_setup(parent)
    assignment = wait_for_assignment(parent, lowered)
    if assignment is None:  # not needed: the script ends here, and MPI with it (normally)
        live.Disconnect()
        parent.Disconnect()
        raise SystemExit(0)
    cfg = Config(**setup["config"])
    os.environ[GENERATION_ENV] = str(assignment["generation"])  # which injected faults apply to it
    flat = FlatParameters(model)
    device = flat.device
    if assignment.get("role") == "tester":  # the tester died: this script's evaluate takes over
        return tester_context(parent, setup, assignment, None, device), \
            dict(live=live, evaluations=assignment["evaluations"])
    rank, exchanges = assignment["rank"], assignment["exchanges"]
    start = MPIBuffer(flat.data, "direct" if device.type == "cpu" else "staged")
    parent.Recv(start.mpi, source=0, tag=Tag.START)
    start.after_recv()
    topo = Topology.build(setup["world_size"], rank, cfg.algo, cfg.servers)
    steps = samples_per_epoch // (topo.num_workers * samples_per_step) if samples_per_epoch else None
    ctx = RunContext(cfg, parent, topo, None, device, NullRunLog(), Path(setup["run_dir"]), StopRequest().install(),
                     None, start.mode, time.perf_counter(), identity=rank)
    return ctx, dict(live=live, position=position_of(exchanges, cfg.tau, steps))


def through_door(run_dir: Path, model: nn.Module, wait: float = 60.0,
           door: dict | None = None) -> tuple[RunContext, dict, int]:
    """A late joiner (:meth:`~mpi_easgd.ps.api.AsyncTraining.join`): connect through ``run_dir``'s door, take
    the center into ``model``; returns the context, what the worker starts from, and the
    joiner's number. A door that is not there ends the process (one line, exit 2); a run
    that is ending too (exit 0)."""
    from mpi_easgd.config import Config
    from mpi_easgd.ps.joiners import JoinRefused, knock, read_door
    from mpi_easgd.runtime.control import StopRequest
    from mpi_easgd.runtime.metrics import NullRunLog
    from mpi_easgd.topology import Topology

    try:
        door = door or read_door(run_dir, wait)
    except JoinRefused as exc:
        print(f"mpi_easgd: error: {exc}", file=sys.stderr, flush=True)
        session.leave(2)
    link = knock(door)
    if link is None:
        print("mpi_easgd: the run is ending; this worker is not needed", file=sys.stderr, flush=True)
        session.leave(0)
    inter, live, place = link
    setup = door["setup"]
    cfg = Config(**setup["config"])
    flat = FlatParameters(model)
    start = MPIBuffer(flat.data, "direct" if flat.device.type == "cpu" else "staged")
    inter.Recv(start.mpi, source=0, tag=Tag.START)
    start.after_recv()
    topo = Topology.build(setup["world_size"], place["rank"], cfg.algo, cfg.servers)  # (a worker with no shard)
    ctx = RunContext(cfg, inter, topo, None, flat.device, NullRunLog(), Path(setup["run_dir"]),
                     StopRequest().install(), None, start.mode, time.perf_counter(), identity=place["rank"])
    return ctx, dict(live=live, position=dict(epoch=place["epoch"], step=0)), place["joiner"]


def rerun_command(script: Path, args: list[str]) -> list[str]:
    """Python's arguments that rerun ``script`` with ``args`` as a spare (under ``python -m
    mpi4py``, as scripts run): MPI starts first, so that the server's Spawn returns at once
    instead of waiting for the script's own imports (torch: 2.5 s of a stalled server
    here), then the script runs as ``__main__`` from its own directory."""
    code = ("import mpi_easgd, runpy, sys; from mpi4py import MPI; "
            f"sys.argv = {[str(script), *args]!r}; sys.path.insert(0, {str(script.parent)!r}); "
            f"runpy.run_path({str(script)!r}, run_name='__main__')")
    return ["-m", "mpi4py", "-c", code]


def tester_context(parent: MPI.Intercomm, setup: dict, assignment: dict, info, device: torch.device) -> RunContext:
    """A spare assigned the place of the tester that died (``assignment``): its context on
    the server's intercommunicator, with a log that appends to the run's metrics rows on
    the run's wall clock (``setup["clock"]``)."""
    from mpi_easgd.config import Config
    from mpi_easgd.runtime.control import StopRequest
    from mpi_easgd.runtime.metrics import RunLog
    from mpi_easgd.topology import Topology

    cfg, rank = Config(**setup["config"]), assignment["rank"]
    started = time.perf_counter() - (time.time() - setup["clock"])
    log = RunLog(Path(setup["run_dir"]), setup["config"], False, cfg.tensorboard, started=started,
                 resumed_at=1 << 62)  # (the dead tester's rows stay)
    log.info(f"a new process stands in for the tester (rank {rank}), which died: it evaluates the snapshots after "
             f"the first {assignment['evaluations']} and writes the summary")
    topo = Topology.build(setup["world_size"], rank, cfg.algo, cfg.servers)
    return RunContext(cfg, parent, topo, info, device, log, Path(setup["run_dir"]), StopRequest().install(), None,
                      "direct" if device.type == "cpu" else "staged", started, identity=rank)
