"""An asynchronous worker: local steps on its own shard, an exchange every ``tau`` steps.

Per local step ``t`` (the paper's Algorithm 1)::

    g = gradient at x
    if t % tau == 0: exchange with the server (send, receive, absorb the reply)
    x = optimizer step with g

After its last epoch, or at the next step after a stop signal, the worker makes one final
exchange (so no local progress is lost), then tells the server it is done.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI

from mpi_easgd import faults
from mpi_easgd.algorithms.easgd import worker_rule
from mpi_easgd.algorithms.protocol import Tag, done_message
from mpi_easgd.config import Config
from mpi_easgd.control import StopRequest
from mpi_easgd.data import ShardLoader
from mpi_easgd.flat import FlatParameters, MPIBuffer
from mpi_easgd.loop import NonFiniteError, finite, make_optimizer, run_epoch, supervised_step
from mpi_easgd.metrics import NullRunLog
from mpi_easgd.watchdog import Watchdog


class _Stop(Exception):
    """A stop was requested: leave the epoch loop after the current step."""


def run_worker(cfg: Config, comm: MPI.Comm, flat: FlatParameters, loader: ShardLoader,
               server: int, device: torch.device, stop: StopRequest,
               saved: dict | None = None, transfer: str = "auto") -> tuple[dict, dict]:
    """Train on ``loader`` for ``cfg.epochs`` epochs (or until ``stop``), starting from
    ``saved`` state if given; returns (statistics, state to checkpoint)."""
    model = flat.module
    optimizer = make_optimizer(cfg, model, nesterov=cfg.algo == "eamsgd")
    rule = worker_rule(cfg.algo, flat.data, cfg.alpha)
    position = {"epoch": 0, "step": 0, "t": 0, "samples": 0, "exchanges": 0}
    if saved is not None:
        model.load_state_dict(saved["model"])  # copies into the flat buffer
        optimizer.load_state_dict(saved["optimizer"])
        rule.load_state_dict(saved["rule"])
        position = saved["position"]
    send, reply = MPIBuffer(rule.send, transfer), MPIBuffer(rule.reply, transfer)
    forward_backward = supervised_step(model, flat.zero_grad)
    latencies: list[float] = []
    checksums: list[float] = []  # audit: what this worker sent, in order
    t, samples, skipped = position["t"], position["samples"], 0

    watchdog = Watchdog(comm, cfg.worker_timeout, lambda _: f"the server (rank {server})").start()

    def exchange() -> None:
        rule.prepare()
        send.before_send()
        if cfg.audit:
            checksums.append(float(rule.send.double().sum()))
        t0 = time.perf_counter()
        watchdog.expect("server")
        comm.Sendrecv(send.mpi, dest=server, sendtag=Tag.EXCHANGE,
                      recvbuf=reply.mpi, source=server, recvtag=Tag.REPLY)
        watchdog.release("server")
        latencies.append(time.perf_counter() - t0)
        reply.after_recv()
        rule.absorb()

    def step(batch):
        nonlocal t, samples, skipped
        loss = forward_backward(batch)
        if not finite(loss, flat.grad):
            if cfg.on_nonfinite == "stop":
                raise NonFiniteError(f"non-finite loss or gradient on worker rank {comm.Get_rank()}; "
                                     f"lower --lr or run with --on-nonfinite skip")
            skipped, loss = skipped + 1, None  # x stays finite: no NaN reaches the center
        if t % cfg.tau == 0:
            exchange()
        if loss is not None:
            optimizer.step()
        t += 1
        samples += len(batch[1])
        return loss

    def after_step(i: int, _stats) -> None:
        if stop.requested:
            position["step"] = i + 1
            raise _Stop

    step = faults.wrap_step(step, comm.Get_rank())
    start = time.perf_counter()
    bar = NullRunLog().progress(0, "")
    preempted = False
    try:
        for epoch in range(position["epoch"], cfg.epochs):
            first = position["step"] if epoch == position["epoch"] else 0
            position["epoch"], position["step"] = epoch, first
            run_epoch(step, loader.epoch(epoch, first), loader.steps, bar, device, start=first,
                      after_step=after_step)
            position["epoch"], position["step"] = epoch + 1, 0
    except _Stop:
        preempted = True
    exchange()  # flush the steps since the last exchange
    exchanges = position["exchanges"] + len(latencies)  # over every segment of a resumed run
    comm.Send(done_message(exchanges, t, samples, preempted), dest=server, tag=Tag.DONE)
    watchdog.stop()
    lat = np.asarray(latencies) * 1e3
    stats = dict(
        rank=comm.Get_rank(), exchanges=exchanges, steps=t, samples=samples,
        wall_seconds=time.perf_counter() - start, nonfinite_skipped=skipped,
        latency_ms_mean=float(lat.mean()), latency_ms_p50=float(np.percentile(lat, 50)),
        latency_ms_p99=float(np.percentile(lat, 99)),
        **({"audit_checksums": checksums} if cfg.audit else {}),
    )
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), rule=rule.state_dict(),
                 position=dict(position, t=t, samples=samples, exchanges=exchanges))
    return stats, state
