"""Asynchronous EASGD / EAMSGD / DOWNPOUR: the server, worker and tester roles together.

Every rank builds the same model; the server's initial parameters become the center and
every worker's starting point (one broadcast). Each role then runs its own loop; at the
end one gather brings every role's statistics to the tester, which writes the summary.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from mpi_easgd import checkpoint
from mpi_easgd.algorithms.easgd import ServerRule
from mpi_easgd.algorithms.server import Server
from mpi_easgd.algorithms.worker import run_worker
from mpi_easgd.config import Config
from mpi_easgd.control import Preempted, StopRequest
from mpi_easgd.data import DatasetInfo, ShardLoader
from mpi_easgd.flat import FlatParameters, MPIBuffer
from mpi_easgd.models import build_model
from mpi_easgd.tester import run_tester, save_model
from mpi_easgd.topology import Topology
from mpi_easgd.watchdog import Watchdog


def run_async(cfg: Config, comm: MPI.Comm, topo: Topology, info: DatasetInfo, device: torch.device,
              log, run_dir: Path, stop: StopRequest, resume: Path | None,
              transfer: str = "auto") -> dict | None:
    """Run this rank's role; returns the run summary on the tester, None elsewhere.

    A checkpoint is written when the run ends, and when a stop signal ends it early (then
    :class:`Preempted` is raised on every rank after the checkpoint is complete).
    """
    torch.manual_seed(cfg.seed)
    flat = FlatParameters(build_model(cfg.model, info.shape, info.num_classes).to(device))
    saved = checkpoint.load_rank(resume, topo.rank) if resume else None
    p = topo.num_workers
    server = None
    if topo.role == "server":
        server = Server(comm, flat.data, ServerRule(cfg.algo, cfg.alpha), topo.worker_ranks,
                        topo.tester_rank, test_every=cfg.test_every,
                        samples_per_exchange=cfg.tau * cfg.batch_size, audit=cfg.audit,
                        peer_timeout=cfg.worker_timeout)
        if saved is not None:
            server.load_state_dict(saved)  # the center is the starting point again
    start = MPIBuffer(flat.data, transfer)
    start.before_send()
    comm.Bcast(start.mpi, root=topo.server_rank)
    start.after_recv()
    if resume is not None:
        log.info(f"resumed from {resume}")
    log.info(
        f"{cfg.algo}: server rank {topo.server_rank}, tester rank {topo.tester_rank}, {p} workers; "
        f"model {cfg.model} ({flat.numel:,} parameters), {info.name} {info.sizes['train']} train / "
        f"{info.sizes['test']} test, batch {cfg.batch_size} per worker, tau {cfg.tau}, "
        f"alpha {cfg.alpha:.4g} (beta {p * cfg.alpha:.3g}), lr {cfg.lr}, momentum {cfg.momentum}"
    )
    state = None
    if server is not None:
        try:
            server.run()
        finally:  # the server owns the center: keep it even if a peer was lost at the end
            save_model(flat.module, run_dir / "center.pt")
        stats, state = server.stats(), server.state_dict()
        if cfg.audit:
            order = np.array([i for i, _ in server.audit], dtype=np.int64)
            payloads = torch.stack([x for _, x in server.audit]).numpy()
            np.savez(run_dir / "audit.npz", initial=server.initial.numpy(), final=flat.data.numpy(),
                     order=order, payloads=payloads, alpha=cfg.alpha, algo=cfg.algo)
    elif topo.role == "worker":
        loader = ShardLoader(info, "train", topo.worker_index, p, batch_size=cfg.batch_size,
                             seed=cfg.seed, even=not cfg.uneven, augment=cfg.augment,
                             prefetch=cfg.prefetch)
        stats, state = run_worker(cfg, comm, flat, loader, topo.server_rank, device, stop, saved, transfer)
    else:
        test = ShardLoader(info, "test", batch_size=512, shuffle=False, even=False)
        train = ShardLoader(info, "train", batch_size=cfg.batch_size, seed=cfg.seed)
        stats = run_tester(comm, flat, test, train, topo.server_rank, device, log, transfer)
        state = {"evaluations": stats["evaluations"]}  # every rank has a file: one check on resume
    # The tester gathers everyone's statistics; if it hung after taking the final center,
    # this is where the others would wait, so they watch it here too.
    guard = None
    if topo.role != "tester":
        guard = Watchdog(comm, cfg.worker_timeout, lambda _: f"tester rank {topo.tester_rank}").start()
        guard.expect("tester")
    everything = comm.gather(stats, root=topo.tester_rank)
    if guard is not None:
        guard.stop()
    stopped, updates = comm.bcast((stats["stopped"], stats["updates"]) if server else None,
                                  root=topo.server_rank)
    ckpt = checkpoint.step_dir(run_dir, updates)
    if state is not None:
        checkpoint.save_rank(ckpt, topo.rank, state)
    comm.Barrier()  # every role's file is on disk before the checkpoint is marked complete
    if topo.rank == 0:
        checkpoint.commit(run_dir, ckpt, dict(config=dataclasses.asdict(cfg), world_size=topo.world_size,
                                              updates=updates))
    if stopped:
        raise Preempted(ckpt)
    if topo.role != "tester":
        return None
    return _summary(cfg, topo, info, everything)


def _summary(cfg: Config, topo: Topology, info: DatasetInfo, everything: list[dict]) -> dict:
    server = everything[topo.server_rank]
    final = everything[topo.tester_rank]
    workers = [everything[r] for r in topo.worker_ranks]
    per_worker = [dict(w, **s) for w, s in zip(workers, server["per_worker"])]
    samples = sum(w["samples"] for w in workers)
    seconds = max(w["wall_seconds"] for w in workers)
    return dict(
        algo=cfg.algo, model=cfg.model, dataset=info.name, world_size=topo.world_size,
        workers=topo.num_workers, epochs=cfg.epochs, tau=cfg.tau, alpha=cfg.alpha,
        beta=cfg.alpha * topo.num_workers, lr=cfg.lr, momentum=cfg.momentum,
        test_accuracy=final["test_accuracy"], test_loss=final["test_loss"],
        evaluations=final["evaluations"], exchanges=server["updates"],
        train_samples=samples, train_seconds=seconds,
        train_samples_per_second=samples / seconds if seconds else 0.0,
        server_busy_fraction=server["server_busy_fraction"], per_worker=per_worker,
        nonfinite_skipped=sum(w["nonfinite_skipped"] for w in workers),
    )
