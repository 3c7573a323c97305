"""The asynchronous family (EASGD, EAMSGD, DOWNPOUR, async DiLoCo): the server, worker and
tester roles of one run together.

Every rank builds the same model; the server's initial parameters become the center and
every worker's starting point (one broadcast). Each role then runs its own loop (the
server :meth:`Server.run`, a worker the training loop with :class:`AsyncWorker`, the
tester :func:`run_tester`); at the
end every role still in the run sends its statistics to the tester, which writes the
summary. There is no collective after the start, so a worker dropped under
``--on-worker-loss continue`` holds nothing up; the tester then ends the job (and the
dropped rank with it) once the summary is written. Under ULFM a worker that died is
simply gone; with ``--on-worker-loss respawn`` a replacement (:mod:`mpi_easgd.ps.join`)
takes over its rank, and its statistics reach the tester through the server.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch
from mpi4py import MPI

from mpi_easgd import registry
from mpi_easgd.data import ShardLoader
from mpi_easgd.flat import FlatParameters
from mpi_easgd.models import build_model
from mpi_easgd.ps.liveness import say_dropped
from mpi_easgd.ps.policies import loss_policy
from mpi_easgd.ps.protocol import Inbox, Tag, WorkerEndpoint, receive_object, wait_politely
from mpi_easgd.ps.server import Server
from mpi_easgd.ps.spares import Spares
from mpi_easgd.ps.stats import ServerStats, WorkerStats, summarise
from mpi_easgd.ps.tester import run_tester
from mpi_easgd.ps.worker import AsyncWorker, WorkerDropped
from mpi_easgd.rules.asynchronous import server_rule
from mpi_easgd.runtime import checkpoint, ft, mpienv
from mpi_easgd.runtime.context import RunContext
from mpi_easgd.runtime.control import PeerLost, Preempted
from mpi_easgd.runtime.loop import nonfinite_note, train
from mpi_easgd.runtime.metrics import NullRunLog
from mpi_easgd.runtime.watchdog import Watchdog
from mpi_easgd.topology import Topology
from mpi_easgd.transfer import MPIBuffer, exchange_dtype


def run_async(ctx: RunContext) -> dict | None:
    """Run this rank's role; returns the run summary on the tester, None elsewhere.

    The server coordinates checkpoints (periodic, and when training ends). When a stop
    signal ended training early, :class:`Preempted` is raised on every rank still in the
    run once the checkpoint is complete.
    """
    cfg, comm, topo, info = ctx.cfg, ctx.comm, ctx.topo, ctx.info
    live = comm.Dup()  # liveness traffic (heartbeats, DROPPED, wake-up) never meets a training receive
    torch.manual_seed(cfg.seed)
    flat = FlatParameters(build_model(cfg.model, info.shape, info.num_classes).to(ctx.device))
    saved = _saved_state(ctx.resume, topo.rank) if ctx.resume else None
    server = _make_server(ctx, live, flat, saved) if topo.role == "server" else None
    start = MPIBuffer(flat.data, ctx.transfer)  # the server's parameters: everyone's starting point
    start.before_send()
    comm.Bcast(start.mpi, root=topo.server_rank)
    start.after_recv()
    if ctx.resume is not None:
        ctx.log.info(f"resumed from {ctx.resume}")
    p = topo.num_workers
    ctx.log.info(
        f"{cfg.algo}: server rank {topo.server_rank}, tester rank {topo.tester_rank}, {p} workers; "
        f"model {cfg.model} ({flat.numel:,} parameters), {info.name} {info.sizes['train']} train / "
        f"{info.sizes['test']} test, batch {cfg.batch_size} per worker, tau {cfg.tau}, "
        + (f"outer lr {cfg.outer_lr}, momentum {cfg.outer_momentum}, delay {cfg.outer_delay}"
           if registry.lookup(cfg.algo).outer else f"alpha {cfg.alpha:.4g} (beta {p * cfg.alpha:.3g})")
        + f", {cfg.optimizer} lr {cfg.lr}, momentum {cfg.momentum}"
        + (", overlapped exchanges" if cfg.overlap_exchange else "")
    )
    if server is not None:
        return _serve(ctx, server, flat)
    if topo.role == "worker":
        return work(ctx, live, flat, saved)
    return _test(ctx, live, flat, saved)


def _save_rank(ctx: RunContext, step: int, state: dict) -> bool:
    """Write this rank's file of checkpoint ``step``; False (and said why) if it failed."""
    return checkpoint.try_save_rank(checkpoint.step_dir(ctx.run_dir, step), ctx.topo.rank, state)


def _make_server(ctx: RunContext, live: MPI.Comm, flat: FlatParameters, saved: dict | None) -> Server:
    cfg, topo, run_dir = ctx.cfg, ctx.topo, ctx.run_dir

    def commit(step: int, extra: dict, workers_written: bool) -> Path:
        ckpt = checkpoint.step_dir(run_dir, step)
        if not workers_written or not _save_rank(ctx, step, server.state_dict()):
            checkpoint.discard(ckpt)  # every write is over: the workers wait for the server
            raise checkpoint.CheckpointFailed(ckpt)
        # The tester's only state is how many snapshots it has been sent (it evaluates each).
        checkpoint.save_rank(ckpt, topo.tester_rank, {"evaluations": server.feed.snapshots})
        checkpoint.commit(run_dir, ckpt, dict(config=dataclasses.asdict(cfg), world_size=topo.world_size,
                                              updates=server.updates,
                                              wall_seconds=time.perf_counter() - ctx.started, **extra))
        return ckpt

    rule = server_rule(cfg.algo, cfg.alpha, cfg.outer_lr, cfg.outer_momentum, cfg.outer_delay)
    spares = None
    if cfg.on_worker_loss == "respawn":
        spares = Spares(dict(config=dataclasses.asdict(cfg), run_dir=str(run_dir), world_size=topo.world_size,
                             cwd=os.getcwd(), crowded=mpienv.oversubscribed(extra=1)))
    server = Server(ctx.comm, live, flat.data, rule, topo.worker_ranks,
                    topo.tester_rank, test_every=cfg.test_every, save=commit,
                    samples_per_exchange=cfg.tau * cfg.batch_size, audit=cfg.audit,
                    peer_timeout=cfg.worker_timeout, policy=loss_policy(cfg.on_worker_loss, spares),
                    checkpoint_every=cfg.checkpoint_every, wire=exchange_dtype(cfg.exchange_dtype),
                    wait_replies=not cfg.overlap_exchange)
    if saved is not None:
        server.load_state_dict(saved)  # the center is the starting point again
    return server


def _serve(ctx: RunContext, server: Server, flat: FlatParameters) -> None:
    cfg, run_dir = ctx.cfg, ctx.run_dir
    try:
        server.run()
    finally:  # the server owns the center: keep it even if a peer was lost at the end
        checkpoint.save_model(flat.module, run_dir / "center.pt")
    stats = server.stats()
    stats.relayed = server.policy.relayed(server.roster, cfg.worker_timeout)
    if server.audit is not None:
        server.audit.write(run_dir / "audit.npz", server.versions.rule, flat.data)
    # Sent once everything is on disk: the tester may end the job after its summary.
    _send_stats(ctx.comm, stats, ctx.topo.tester_rank, cfg.worker_timeout)
    if ft.enabled():
        _hear_gathered(ctx, Path(stats.checkpoint))
    if set(stats.lost_workers) - set(stats.dead_workers):
        # A dropped worker that is only hung may still send (it wakes up and exchanges before it
        # learns it was dropped): MPICH fails an assertion when MPI_Finalize meets such a message.
        # The tester ends the job once the summary is written (exit 3, or 75 when stopped).
        time.sleep(cfg.worker_timeout)
    if stats.stopped:
        raise Preempted(Path(stats.checkpoint))


def _hear_gathered(ctx: RunContext, final: Path) -> None:
    """(ULFM) Wait until the tester has every role's statistics: under ULFM the sends to a
    dead tester may complete, and nothing else would say that the summary is lost."""
    tester = ctx.topo.tester_rank
    lost = (f"the tester (rank {tester}) died; training finished, the center is saved as center.pt and in {final}, "
            f"but the run's summary is not written")
    arrived = False
    with ft.survivable() as death:
        arrived, _ = receive_object(ctx.comm, tester, Tag.GATHERED, time.monotonic() + ctx.cfg.worker_timeout)
    if death:
        raise PeerLost(lost)
    if not arrived:
        raise PeerLost(lost.replace("died", f"did not answer within --worker-timeout {ctx.cfg.worker_timeout:g}s"))


def work(ctx: RunContext, live: MPI.Comm, flat: FlatParameters, saved: dict | None,
         stats_to: int | None = None) -> None:
    """Train as a worker until the run ends; its statistics go to the tester (a replacement
    worker: ``stats_to``, the server)."""
    cfg, topo = ctx.cfg, ctx.topo
    loader = ShardLoader(ctx.info, "train", topo.worker_index, topo.num_workers, batch_size=cfg.batch_size,
                         seed=cfg.seed, even=not cfg.uneven, augment=cfg.augment, prefetch=cfg.prefetch)
    endpoint = WorkerEndpoint(ctx.comm, live, topo.server_rank)
    worker = AsyncWorker(ctx, flat, endpoint, lambda step, state: _save_rank(ctx, step, state), saved)
    try:
        stopped = train(worker, loader, worker.position, cfg, steps=loader.steps, rank=topo.rank,
                        device=ctx.device, log=NullRunLog())
        stats, step, stopped = worker.finish(worker.position, stopped)
    except WorkerDropped:
        worker.close()
        idle_forever(ctx.rank)
    finally:
        worker.close()
    _send_stats(ctx.comm, stats, topo.tester_rank if stats_to is None else stats_to, cfg.worker_timeout)
    if stopped:
        raise Preempted(checkpoint.step_dir(ctx.run_dir, step))


def idle_forever(rank: int) -> None:
    """A dropped worker no longer counts, but cannot leave an MPI job: it waits, off the
    CPU, to be ended with it."""
    say_dropped(rank)
    while True:
        time.sleep(60)


def _test(ctx: RunContext, live: MPI.Comm, flat: FlatParameters, saved: dict | None) -> dict:
    cfg, topo, info, log = ctx.cfg, ctx.topo, ctx.info, ctx.log
    test = ShardLoader(info, "test", batch_size=512, shuffle=False, even=False)
    train_data = ShardLoader(info, "train", batch_size=cfg.batch_size, seed=cfg.seed)
    final = run_tester(ctx.comm, flat, test, train_data, topo.server_rank, ctx.device, log, ctx.transfer,
                       evaluations=saved["evaluations"] if saved else 0)  # (TesterStats)
    server, workers = _gather_stats(ctx.comm, live, topo, cfg.worker_timeout)
    if ft.enabled():
        ctx.comm.send(None, dest=topo.server_rank, tag=Tag.GATHERED)
    if server.stopped:
        raise Preempted(Path(server.checkpoint), server.lost_workers)
    summary = summarise(cfg, info, topo.world_size, topo.num_workers, topo.worker_ranks, server, final, workers)
    note = nonfinite_note(summary["nonfinite_skipped"], sum(w.get("steps", 0) for w in summary["per_worker"]))
    if note:
        log.warn(note)
    return summary


def _saved_state(resume: Path, rank: int) -> dict:
    """This rank's state in checkpoint ``resume``; for a worker lost in that run, only the
    position from which it rejoins (its parameters start from the center)."""
    rejoin = checkpoint.read_manifest(resume).get("rejoin", {}).get(str(rank))
    if rejoin is not None:
        return {"position": rejoin}
    return checkpoint.load_rank(resume, rank)


def _send_stats(comm: MPI.Comm, stats: WorkerStats | ServerStats, tester: int, timeout: float) -> None:
    sent = False
    with ft.survivable() as death:  # (ULFM) it died: the server says so (_hear_gathered), once for the job
        request = comm.isend(stats, dest=tester, tag=Tag.STATS)
        sent = wait_politely([request], time.monotonic() + timeout)
    if death:
        return
    if not sent:
        raise PeerLost(f"tester rank {tester} did not take the run statistics within --worker-timeout "
                       f"{timeout:g}s; the checkpoint is complete, the run's summary is not written")


def _gather_stats(comm: MPI.Comm, live: MPI.Comm, topo: Topology,
                  timeout: float) -> tuple[ServerStats, dict[int, WorkerStats]]:
    """Every role's statistics, on the tester: the server's first (it says which workers
    were lost), then each remaining worker's."""
    inbox = Inbox(live, topo.server_rank)  # the server's heartbeats while it writes the checkpoint
    guard = Watchdog(comm, timeout, lambda rank: f"rank {rank} (its run statistics)",
                     heard=lambda rank: inbox.heard() if rank == topo.server_rank else 0.0).start()
    guard.expect(topo.server_rank)
    server: ServerStats = comm.recv(source=topo.server_rank, tag=Tag.STATS)
    guard.release(topo.server_rank)
    workers = {}
    for rank in topo.worker_ranks:
        if rank in server.lost_workers or rank in server.dead_workers:
            continue  # (a dead worker's replacement sent its statistics with the server's)
        guard.expect(rank)
        workers[rank] = comm.recv(source=rank, tag=Tag.STATS)
        guard.release(rank)
    guard.stop()
    inbox.close()
    return server, workers
