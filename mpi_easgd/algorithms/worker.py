"""An asynchronous worker: local steps on its own shard, an exchange every ``tau`` steps.

Per local step ``t`` (the paper's Algorithm 1)::

    g = gradient at x
    if t % tau == 0: exchange with the server (send, receive, absorb the reply)
    x = optimizer step with g

After its last epoch the worker makes one final exchange (so no local progress is lost),
then tells the server it is done.
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
from mpi_easgd.data import ShardLoader
from mpi_easgd.flat import FlatParameters, MPIBuffer
from mpi_easgd.loop import make_optimizer, run_epoch, supervised_step
from mpi_easgd.metrics import NullRunLog


def run_worker(cfg: Config, comm: MPI.Comm, flat: FlatParameters, loader: ShardLoader,
               server: int, device: torch.device) -> dict:
    """Train on ``loader`` for ``cfg.epochs`` epochs; returns this worker's statistics."""
    model = flat.module
    optimizer = make_optimizer(cfg, model, nesterov=cfg.algo == "eamsgd")
    rule = worker_rule(cfg.algo, flat.data, cfg.alpha)
    send, reply = MPIBuffer(rule.send), MPIBuffer(rule.reply)
    forward_backward = supervised_step(model, flat.zero_grad)
    latencies: list[float] = []
    checksums: list[float] = []  # audit: what this worker sent, in order
    t = 0

    def exchange() -> None:
        rule.prepare()
        send.before_send()
        if cfg.audit:
            checksums.append(float(rule.send.double().sum()))
        t0 = time.perf_counter()
        comm.Sendrecv(send.mpi, dest=server, sendtag=Tag.EXCHANGE,
                      recvbuf=reply.mpi, source=server, recvtag=Tag.REPLY)
        latencies.append(time.perf_counter() - t0)
        reply.after_recv()
        rule.absorb()

    def step(batch):
        nonlocal t
        loss = forward_backward(batch)
        if t % cfg.tau == 0:
            exchange()
        optimizer.step()
        t += 1
        return loss

    step = faults.wrap_step(step, comm.Get_rank())
    start = time.perf_counter()
    samples, bar = 0, NullRunLog().progress(0, "")
    for epoch in range(cfg.epochs):
        samples += run_epoch(step, loader.epoch(epoch), loader.steps, bar, device).samples
    exchange()  # flush the steps since the last exchange
    comm.Send(done_message(len(latencies), t, samples), dest=server, tag=Tag.DONE)
    lat = np.asarray(latencies) * 1e3
    return dict(
        rank=comm.Get_rank(), exchanges=len(latencies), steps=t, samples=samples,
        wall_seconds=time.perf_counter() - start,
        latency_ms_mean=float(lat.mean()), latency_ms_p50=float(np.percentile(lat, 50)),
        latency_ms_p99=float(np.percentile(lat, 99)),
        **({"audit_checksums": checksums} if cfg.audit else {}),
    )
