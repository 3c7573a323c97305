"""An asynchronous worker: local steps on its own shard, an exchange every ``tau`` steps.

Per local step ``t`` (the paper's Algorithm 1), with the gradient at ``x`` computed by the
training loop (:func:`mpi_easgd.runtime.loop.train`)::

    if t % tau == 0: exchange with the server (send, receive, absorb the reply)
    x = optimizer step with the gradient

With ``--overlap-exchange`` the exchange does not wait: the worker sends a snapshot of
``x`` and keeps stepping while the message and the reply are in flight (one ``Test`` per
step moves them on, since MPI progresses only inside MPI calls). When the reply ``c``
lands, the move is computed from the parameters that were sent and the steps taken
meanwhile stay: EASGD/EAMSGD ``x -= alpha (sent - c)``; DOWNPOUR and async DiLoCo
``x = c + (x - sent)``. At most one exchange is in flight: the next one, a checkpoint and
the end first wait for it to land.

At each step boundary the worker looks (one ``Test``) for a command from the server: SAVE
(write this worker's checkpoint file, answer SAVED, wait for RESUME). A stop signal, or
the liveness thread learning that the server dropped this worker, ends its training.
After its last epoch, or the stop, it makes one final exchange (so no local progress is
lost), tells the server it is done and follows its commands until the run ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from mpi4py import MPI

from mpi_easgd.compress import wire_format
from mpi_easgd.flat import FlatParameters
from mpi_easgd.ps.liveness import watch_server
from mpi_easgd.ps.protocol import Command, WorkerEndpoint, shard_bounds, sleep_until
from mpi_easgd.ps.stats import WorkerStats
from mpi_easgd.ps.wire import WorkerWire
from mpi_easgd.rules.asynchronous import worker_rule
from mpi_easgd.runtime import faults
from mpi_easgd.runtime.context import RunContext
from mpi_easgd.runtime.loop import Action, Position


class WorkerDropped(Exception):
    """The server dropped this worker (it was silent too long, ``--on-worker-loss
    continue``): it no longer counts. Raised wherever the worker learns it; caught once,
    by :func:`mpi_easgd.ps.roles.work`, which then waits to be ended with the job."""


class AsyncWorker:
    """One worker of an async run, as the training loop sees it (see the module docstring).

    ``optimizer`` takes the local steps (on ``flat``'s model); ``save(step, state) ->
    written`` writes this worker's checkpoint file; ``saved`` is the state to start from (a
    worker lost in the saved run has only a position). ``group``: with ``--groups``, the
    :class:`~mpi_easgd.ps.groups.GroupRounds` of the group this worker leads."""

    def __init__(self, ctx: RunContext, flat: FlatParameters, endpoint: WorkerEndpoint,
                 optimizer: torch.optim.Optimizer, save: Callable[[int, dict], bool],
                 saved: dict | None = None, group=None) -> None:
        cfg = ctx.cfg
        self.group = group  # (--groups) this leader's group: it averages first, then shares what it got
        self.stopping = False  # (--groups) a rank of the group was asked to stop
        self.ctx, self.cfg, self.flat, self.model = ctx, cfg, flat, flat.module
        self.endpoint, self.write = endpoint, save
        self.optimizer = optimizer
        self.rule = worker_rule(cfg.algo, flat.data, cfg.alpha, overlap=cfg.overlap_exchange)
        # x is the center the server started this worker from: both ends of a compressed
        # exchange start their references there
        self.bounds = shard_bounds(flat.numel, ctx.topo.servers)
        self.wire = WorkerWire(self.rule, wire_format(cfg.exchange_dtype, cfg.topk_fraction), ctx.transfer,
                               flat.data, self.bounds)
        self.position = Position()
        self.rest = None  # (data.rest) the epoch's samples re-sharded over the workers, when the size changed
        self.exchanges = 0  # over every segment of a resumed run
        if saved is not None:
            if "model" in saved:  # else it rejoins from the center it was given
                self.model.load_state_dict(saved["model"])  # copies into the flat buffer
                self.optimizer.load_state_dict(saved["optimizer"])
                self.rule.load_state_dict(saved["rule"])
                self.wire.load_state_dict(saved.get("wire", {}))
            self.position = Position.from_state(saved["position"])
            self.exchanges = int(saved["position"].get("exchanges", 0))
        self.latencies: list[float] = []  # from each send to its reply landing
        self.waited = 0.0  # seconds this worker spent blocked on exchanges
        self.steps_in_flight = 0  # local steps taken while an exchange was in flight
        self.checksums: list[float] = []  # audit: what this worker sent, in order
        link = faults.emulated_link(ctx.rank)  # an emulated network: each exchange's least duration (0: none)
        self.delay = link.seconds(sum(self.wire.bytes_each_way)) if link else 0.0
        self._flight: tuple[list[MPI.Request], float] | None = None  # overlapped: (requests, sent at)
        self.watchdog = watch_server(ctx.comm, endpoint.liveness, cfg.worker_timeout)
        self.started = time.perf_counter() - self.position.seconds
        self._step = 0  # the checkpoint step that a SAVE command named

    # ---- the loop's interface --------------------------------------------------------

    def step(self, pos: Position, has_grad: bool) -> None:
        if self._flight is not None:
            self._land(wait=False)
        if self.group is not None and self.group.due(pos.t):
            self.stopping |= self.group.average(self.ctx.stop.requested)
        if pos.t % self.cfg.tau == 0:
            self.exchange()
            if self.group is not None:
                self.group.share()
        self.steps_in_flight += self._flight is not None
        if has_grad:  # else x stays finite: no NaN reaches the center
            self.optimizer.step()

    def boundary(self, pos: Position) -> Action:
        stop = self.stopping if self.group is not None else self.ctx.stop.requested  # (a group stops together)
        if stop or self.endpoint.liveness.dropped:
            return Action.STOP
        command = self.endpoint.inbox.poll()
        if command is None:
            return Action.NONE
        if command[0] != Command.SAVE:  # RESUME and END only ever answer SAVED and DONE
            raise RuntimeError(f"worker rank {self.ctx.rank} got command {command} from the server while training")
        self._step = command[1]
        return Action.SAVE

    def save(self, pos: Position) -> None:
        """Write this worker's file, answer SAVED, and wait until the server has saved too."""
        self._save(pos)

    def _save(self, pos: Position) -> tuple[int, int, int]:
        self._land()  # the server has applied it: so must the saved worker
        written = self.write(self._step, self.state_dict(pos))  # a failure is printed there; the server ends the job
        self.endpoint.saved(pos.epoch if written else -1)
        return self._from_server()  # no exchange until the server has saved too

    def end_epoch(self, pos: Position) -> None:
        pass

    def state_dict(self, pos: Position) -> dict:
        position = dict(pos.state_dict(), exchanges=self.exchanges + len(self.latencies),
                        seconds=time.perf_counter() - self.started)
        rest = self.rest.state_dict() if self.rest is not None and self.rest.epoch == pos.epoch else None
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    rule=self.rule.state_dict(), wire=self.wire.state_dict(), position=position, rest=rest)

    # ---- the exchange and the end ----------------------------------------------------

    def exchange(self) -> None:
        """Send this worker's message and take in the reply; overlapped, only send (the
        reply lands in :meth:`_land`)."""
        self._land()  # at most one in flight
        self.rule.prepare()
        applied = self.wire.before_send()
        if self.cfg.audit:  # as the servers will apply it
            self.checksums.append(sum(float(part.double().sum()) for part in applied))
        t0 = time.perf_counter()
        self.watchdog.expect("server")
        if self.cfg.overlap_exchange:
            self._flight = (self.endpoint.start_exchange(self.wire.buffers), t0)
            return
        self.endpoint.exchange(self.wire.buffers)
        if self.delay:
            time.sleep(max(0.0, t0 + self.delay - time.perf_counter()))
        self.waited += time.perf_counter() - t0
        self._landed(t0)

    def _land(self, wait: bool = True) -> None:
        """Take in the overlapped exchange's reply if there is one in flight and it has
        arrived (``wait``: waiting for it, without spinning)."""
        if self._flight is None:
            return
        requests, t0 = self._flight

        def arrived() -> bool:
            return time.perf_counter() >= t0 + self.delay and self.endpoint.landed(requests)

        if not wait and not arrived():
            return
        started = time.perf_counter()
        time.sleep(max(0.0, t0 + self.delay - started))
        sleep_until(lambda: self.endpoint.landed(requests) or self.endpoint.liveness.dropped)
        if not arrived():  # the server gave up on this worker and withdrew the exchange
            raise WorkerDropped
        self.waited += time.perf_counter() - started
        self._flight = None
        self._landed(t0)

    def _landed(self, t0: float) -> None:
        self.watchdog.release("server")
        self.latencies.append(time.perf_counter() - t0)
        self.wire.after_recv()
        for i in self.endpoint.failed:  # its server died (rank 0 serves it from now on): no move on that shard
            a, b = self.bounds[i]
            self.rule.reply[a:b].copy_(self.rule.sent[a:b])
        self.rule.absorb()

    def _from_server(self) -> tuple[int, int, int]:
        """The server's next command (waiting for it); DROPPED raises :class:`WorkerDropped`."""
        self.watchdog.expect("server")
        command = self.endpoint.command()
        self.watchdog.release("server")
        if command[0] == Command.DROPPED:
            raise WorkerDropped
        return command

    def finish(self, pos: Position, stopped: bool) -> tuple[WorkerStats, int, bool]:
        """The final exchange, DONE, then the server's commands until END: (statistics, step
        of the final checkpoint, whether the run was stopped by a signal)."""
        if self.endpoint.liveness.dropped:
            raise WorkerDropped
        if self.group is not None:
            self.group.average(stopped)
        self.exchange()  # flush the steps since the last exchange
        self._land()
        if self.group is not None:
            self.group.share()
        exchanges = self.exchanges + len(self.latencies)
        self.endpoint.done(exchanges, pos.t, pos.samples, stopped)
        seconds = time.perf_counter() - self.started
        command = self._from_server()
        while command[0] != Command.END:  # the server may still ask for this worker's (final) file
            if command[0] == Command.SAVE:
                self._step = command[1]
                command = self._save(pos)
            else:  # RESUME after a checkpoint: wait for the next command
                command = self._from_server()
        self.watchdog.stop()
        waited = self.waited
        if self.group is not None:  # the members end with it; its rounds were waits too, not compute
            self.group.end(command[1], bool(command[2]))
            waited += sum(self.group.seconds)
        stats = WorkerStats.of(self.ctx.rank, exchanges, pos.t, pos.samples, seconds, pos.skipped, self.latencies,
                               waited, self.steps_in_flight, self.wire.bytes_each_way,
                               self.checksums if self.cfg.audit else None)
        return stats, command[1], bool(command[2])

    def close(self) -> None:
        """Stop watching the server (also when training ended in an error)."""
        self.watchdog.stop()
        if self.group is not None:
            self.group.close()
