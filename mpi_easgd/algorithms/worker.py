"""An asynchronous worker: local steps on its own shard, an exchange every ``tau`` steps.

Per local step ``t`` (the paper's Algorithm 1)::

    g = gradient at x
    if t % tau == 0: exchange with the server (send, receive, absorb the reply)
    x = optimizer step with g

After its last epoch, or at the next step after a stop signal, the worker makes one final
exchange (so no local progress is lost), then tells the server it is done and follows its
commands until the run ends. Between steps it checks (one ``Test``) for a command from the
server: SAVE (write this worker's checkpoint file, answer, wait for RESUME), or DROPPED
(the server gave up on this worker: stay idle until the job ends).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from mpi4py import MPI

from mpi_easgd import faults
from mpi_easgd.algorithms.easgd import worker_rule
from mpi_easgd.algorithms.protocol import Command, WorkerEndpoint
from mpi_easgd.config import Config
from mpi_easgd.control import StopRequest
from mpi_easgd.data import ShardLoader
from mpi_easgd.flat import FlatParameters
from mpi_easgd.loop import NonFiniteError, finite, make_optimizer, run_epoch, supervised_step
from mpi_easgd.metrics import NullRunLog
from mpi_easgd.transfer import MPIBuffer
from mpi_easgd.watchdog import Watchdog


class _Stop(Exception):
    """A stop was requested: leave the epoch loop after the current step."""


def say_dropped(rank: int) -> None:
    print(f"mpi_easgd: warning: the server dropped worker rank {rank} after it was silent "
          f"too long (--on-worker-loss continue); it stays idle until the job ends",
          file=sys.stderr, flush=True)


def idle_forever(rank: int) -> None:
    """A dropped worker cannot leave an MPI job: it waits, off the CPU, to be ended with it."""
    say_dropped(rank)
    while True:
        time.sleep(60)


def run_worker(cfg: Config, comm: MPI.Comm, flat: FlatParameters, loader: ShardLoader,
               server: int, device: torch.device, stop: StopRequest, save: Callable[[int, dict], bool],
               saved: dict | None = None, transfer: str = "auto") -> tuple[dict, int, bool]:
    """Train on ``loader`` for ``cfg.epochs`` epochs (or until ``stop``), starting from
    ``saved`` state if given (a worker lost in the saved run has only a position), and
    write this worker's checkpoint file with ``save(step, state) -> written`` when the server
    says so.
    Returns (statistics, step of the final checkpoint, whether the run was stopped)."""
    model = flat.module
    optimizer = make_optimizer(cfg, model, nesterov=cfg.algo == "eamsgd")
    rule = worker_rule(cfg.algo, flat.data, cfg.alpha)
    # Where this worker is, and its totals over every segment of a resumed run.
    position = {"epoch": 0, "step": 0, "t": 0, "samples": 0, "exchanges": 0, "seconds": 0.0, "skipped": 0}
    if saved is not None:
        if "model" in saved:  # else it rejoins from the center it was given
            model.load_state_dict(saved["model"])  # copies into the flat buffer
            optimizer.load_state_dict(saved["optimizer"])
            rule.load_state_dict(saved["rule"])
        position = dict(position, **saved["position"])
    send, reply = MPIBuffer(rule.send, transfer), MPIBuffer(rule.reply, transfer)
    forward_backward = supervised_step(model, flat.zero_grad)
    latencies: list[float] = []
    checksums: list[float] = []  # audit: what this worker sent, in order
    t, samples, skipped = position["t"], position["samples"], position["skipped"]

    endpoint = WorkerEndpoint(comm, server)
    inbox = endpoint.inbox
    # The server's heartbeats count as signs of life: it may rightly keep this worker
    # waiting (for a slow peer at a checkpoint, or until a hung one is dropped). A worker
    # the server dropped (it was slow, not dead) may be stuck in an exchange the server
    # withdrew: then silence is expected, not a reason to abort.
    def server_silent(key, _seconds) -> bool:
        inbox.settle(1.0)
        if inbox.dropped:  # stuck in an exchange the server withdrew; the job's end ends it
            watchdog.release(key)
            say_dropped(comm.Get_rank())
            return True
        return time.monotonic() - inbox.last_heard < cfg.worker_timeout  # a late heartbeat: alive

    watchdog = Watchdog(comm, cfg.worker_timeout, lambda _: f"the server (rank {server})",
                        on_silent=server_silent, heard=lambda _: inbox.heard()).start()

    def exchange() -> None:
        rule.prepare()
        send.before_send()
        if cfg.audit:
            checksums.append(float(rule.send.double().sum()))
        t0 = time.perf_counter()
        watchdog.expect("server")
        endpoint.exchange(send.mpi, reply.mpi)
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

    def state() -> dict:
        return dict(model=model.state_dict(), optimizer=optimizer.state_dict(), rule=rule.state_dict(),
                    position=dict(position, t=t, samples=samples, exchanges=position["exchanges"] + len(latencies),
                                  seconds=position["seconds"] + time.perf_counter() - start, skipped=skipped))

    def from_server() -> tuple[int, int, int]:
        watchdog.expect("server")
        command = inbox.wait()
        watchdog.release("server")
        return command

    def obey(command) -> tuple[int, int, int] | None:
        """Carry out commands until one lets this worker go on; END's message, else None."""
        while command is not None:
            kind, step, _ = command
            if kind == Command.SAVE:
                written = save(step, state())  # a failure is printed there; the server ends the job
                endpoint.saved(position["epoch"] if written else -1)
                command = from_server()  # no exchange until the server has saved too
            elif kind == Command.RESUME:
                return None
            elif kind == Command.END:
                return command
            else:
                watchdog.stop()
                idle_forever(comm.Get_rank())
        return None

    def after_step(i: int, _stats) -> None:
        position["step"] = i + 1
        if stop.requested:
            raise _Stop
        obey(inbox.poll())

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
    endpoint.done(exchanges, t, samples, preempted)
    seconds = position["seconds"] + time.perf_counter() - start
    end = None
    while end is None:  # the server may still ask for this worker's (final) checkpoint file
        end = obey(from_server())
    watchdog.stop()
    lat = np.asarray(latencies) * 1e3
    stats = dict(
        rank=comm.Get_rank(), exchanges=exchanges, steps=t, samples=samples,
        wall_seconds=seconds, nonfinite_skipped=skipped,
        latency_ms_mean=float(lat.mean()), latency_ms_p50=float(np.percentile(lat, 50)),
        latency_ms_p99=float(np.percentile(lat, 99)),
        **({"audit_checksums": checksums} if cfg.audit else {}),
    )
    return stats, end[1], bool(end[2])
