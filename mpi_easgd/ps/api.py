"""The asynchronous family around your own training loop: :class:`AsyncTraining`.

The same script runs on every rank (``mpiexec -n 4 python -m mpi4py my_script.py``)::

    import mpi_easgd                      # first: it applies settings MPI needs before it starts
    from mpi4py import MPI

    model, optimizer = MyModel(), torch.optim.AdamW(...)          # the same on every rank
    with mpi_easgd.AsyncTraining(MPI.COMM_WORLD, model, optimizer, algo="async-diloco", tau=20,
                                 evaluate=my_metrics, epochs=5, out="runs") as run:
        for epoch in run.epochs():                     # nothing on the server and the tester
            for x, y in run.batches(my_shard(run.worker_index, run.num_workers, epoch)):
                loss = loss_fn(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                if not run.step(loss):                 # exchange every tau steps, optimizer step
                    break                              # a stop signal, or this worker was dropped
    # leaving the block: the worker's final exchange; the server and the tester run their
    # roles there until every worker is done; the summary is written; a stop signal's
    # checkpoint exits 75 (rerun with resume="auto")

Rank 0 is the server (it holds the center: the model's parameters), the last rank the
tester (it evaluates snapshots of the center with ``evaluate(model) -> {name: value}``,
rows in ``metrics.csv``, TensorBoard and the summary), the others workers. Every setting of
the command line is a keyword (``algo`` with ``tau``, ``alpha``, ``outer_lr``...,
``exchange_dtype`` (with ``topk_fraction``), ``overlap_exchange``, ``checkpoint_every``,
``resume``, ``audit``, ``on_worker_loss``, ``worker_timeout``, ``test_every``, ``out``,
``run_name``, ``epochs``...); ``algo`` may be a rule class of your own (:mod:`mpi_easgd.rules.asynchronous`).
Under ULFM, ``on_worker_loss="respawn"`` reruns the script as a spare process: there the
constructor waits to be assigned a dead worker's place and returns as that worker.

The command line (:mod:`.roles`) is one user of this class: it builds the model and the
optimizer from its flags and drives the same worker with the package's training loop.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from mpi4py import MPI
from torch import nn

from mpi_easgd import registry
from mpi_easgd.compress import wire_format
from mpi_easgd.data.rest import Rest
from mpi_easgd.flat import FlatParameters
from mpi_easgd.ps import newcomers
from mpi_easgd.ps.groups import LEADER, GroupMember, GroupRounds, make_groups
from mpi_easgd.ps.liveness import say_dropped
from mpi_easgd.ps.policies import loss_policy
from mpi_easgd.ps.protocol import Inbox, Tag, WorkerEndpoint, receive_object, shard_bounds, wait_politely
from mpi_easgd.ps.server import Server
from mpi_easgd.ps.shards import ShardServer, ShardServers
from mpi_easgd.ps.spares import Spares
from mpi_easgd.ps.stats import ServerStats, TesterStats, WorkerStats, summarise
from mpi_easgd.ps.tester import Evaluate, evaluation_row, run_tester
from mpi_easgd.ps.worker import AsyncWorker, WorkerDropped
from mpi_easgd.rules.asynchronous import server_rule
from mpi_easgd.runtime import checkpoint, faults, ft, mpienv, session
from mpi_easgd.runtime.context import RunContext
from mpi_easgd.runtime.control import PeerLost, Preempted
from mpi_easgd.runtime.loop import Action, EpochStats, NonFiniteError, Position, finite, nonfinite_note
from mpi_easgd.runtime.watchdog import Watchdog
from mpi_easgd.transfer import MPIBuffer

JOIN_ENV = "MPI_EASGD_JOIN"  # a script started with it set to a RUN_DIR joins that run (AsyncTraining.join)


class AsyncTraining:
    """One asynchronous run on ``comm``, this rank's part of it (see the module docstring).

    ``model``: built the same on every rank (the server's parameters start everyone);
    ``optimizer``: the workers' local optimizer on ``model`` (only workers need one);
    ``evaluate``: the tester's ``model -> metrics`` (default: none, the tester only records
    the center's version); ``samples_per_step``: samples in one local step (for the
    summary's counts; default 1); ``samples_per_epoch``: for the ``epoch`` column of the
    metrics. ``settings``: the command line's settings as keywords (``model_name`` and
    ``dataset`` name the model and the data in the run's name and summary).
    """

    def __init__(self, comm: MPI.Comm, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 evaluate: Evaluate | None = None, samples_per_step: int = 1, samples_per_epoch: int | None = None,
                 **settings) -> None:
        parent = MPI.Comm.Get_parent()
        self.joiner: int | None = None  # a late joiner's number (1, 2, ...)
        if parent != MPI.COMM_NULL:  # a spare process the server started to replace a dead worker
            ctx, replacing = newcomers.from_spare(parent, model, samples_per_step, samples_per_epoch)
        elif os.environ.get(JOIN_ENV):  # the script started as a late joiner (see join())
            ctx, replacing, self.joiner = newcomers.through_door(Path(os.environ[JOIN_ENV]), model)
        else:
            ctx, replacing = _open(comm, model, settings), None
        self._setup(ctx, model, optimizer, evaluate, samples_per_step, samples_per_epoch, ctx.cfg.dataset, replacing)

    @classmethod
    def join(cls, run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, *,
             samples_per_step: int = 1, samples_per_epoch: int | None = None, wait: float = 60.0,
             door: dict | None = None) -> AsyncTraining:
        """One more worker for the async run in ``run_dir``, started with
        ``accept_joiners`` (:mod:`.joiners`): wait up to ``wait`` seconds for its door,
        connect, take the current center into ``model`` and train it with your loop as
        any worker does (:meth:`epochs`, :meth:`batches`, :meth:`step`, from the epoch the
        run has reached); it counts in the run's summary. Give it data of its own
        (:attr:`worker_index` is -1: it has no shard; :attr:`joiner` numbers it, for a
        seed). A run that cannot be joined ends this process with one line and exit 2; one
        that is ending, with exit 0. Starting an unchanged script with
        ``$MPI_EASGD_JOIN=RUN_DIR`` makes its ``AsyncTraining(...)`` this call. ``door``:
        :func:`~mpi_easgd.ps.joiners.read_door`'s, when read already."""
        ctx, replacing, joiner = newcomers.through_door(Path(run_dir), model, wait, door)
        run = cls.__new__(cls)
        run.joiner = joiner
        run._setup(ctx, model, optimizer, None, samples_per_step, samples_per_epoch, ctx.cfg.dataset, replacing)
        return run

    @classmethod
    def from_context(cls, ctx: RunContext, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                     evaluate: Evaluate | None, samples_per_step: int, samples_per_epoch: int | None,
                     dataset: str, replacing: dict | None = None) -> AsyncTraining:
        """For the command line, which has validated and opened the run itself.
        ``replacing``: a spare process taking a dead worker's place (:mod:`.join`): its
        liveness communicator and the position the dead worker's exchanges reached; it
        has the center already."""
        run = cls.__new__(cls)
        run.joiner = None
        run._setup(ctx, model, optimizer, evaluate, samples_per_step, samples_per_epoch, dataset, replacing)
        return run

    def _setup(self, ctx: RunContext, model: nn.Module, optimizer, evaluate, samples_per_step: int,
               samples_per_epoch: int | None, dataset: str, replacing: dict | None = None) -> None:
        cfg, comm, topo = ctx.cfg, ctx.comm, ctx.topo
        self.ctx, self.model, self.dataset = ctx, model, dataset
        self.samples_per_step, self.samples_per_epoch, self.evaluate = samples_per_step, samples_per_epoch, evaluate
        self.flat = FlatParameters(model)
        self.server = None
        self.group_comm, self.leaders = None, topo.worker_ranks  # (--groups: only leaders talk to the server)
        self.spares: dict[int, MPI.Comm] = {}
        self.rest: Rest | None = None  # (a resume at another size) the epoch's unseen samples over these workers
        self.lost_at_start: list[int] = []  # (ULFM) workers that died in the start (ranks as the run started)
        if replacing is not None:  # (the server is the only rank a replacement knows)
            # (a worker's: the position the dead one's exchanges reached; a tester's: its evaluations)
            self.live, saved = replacing["live"], {k: v for k, v in replacing.items() if k != "live"}
        else:
            start_fault = faults.from_env(ctx.rank)
            if start_fault:
                start_fault.at_start()  # (injected: a death at the start, before any traffic of the run)
            self.world_ranks = list(range(comm.Get_size()))  # (by rank: each process's rank as the run started)
            while True:  # (ULFM) a worker that dies in the start: start again without it
                try:
                    saved = self._start(ctx)
                    break
                except MPI.Exception as exc:
                    if cfg.on_worker_loss == "abort" or not ft.is_failure(exc):
                        raise
                    ctx = self._without_the_dead(ctx)
            comm, topo = ctx.comm, ctx.topo
        if ctx.resume is not None:
            old_size = checkpoint.read_manifest(ctx.resume)["world_size"]
            ctx.log.info(f"resumed from {ctx.resume}" + (
                "" if old_size == topo.world_size else f", written by {old_size} ranks: each worker starts from the "
                + (f"center, the epoch's unseen samples re-sharded over the {topo.num_workers} workers"
                   if ctx.info is not None else "center, at the start of the epoch the slowest old worker was in "
                   "(a script's loop reads its own data)")))
        p, algo = topo.num_workers, registry.lookup(cfg.algo)
        servers = f"server rank {topo.server_rank}" if topo.servers == 1 else \
            f"server ranks 0-{topo.servers - 1} (a shard of the center each)"
        groups = "" if cfg.groups == "1" else \
            f" in {len(self.leaders)} groups (--groups {cfg.groups}, averaging every {cfg.group_tau or cfg.tau} steps)"
        ctx.log.info(
            f"{cfg.algo}: {servers}, tester rank {topo.tester_rank}, {p} workers{groups}; "
            f"model {cfg.model} ({self.flat.numel:,} parameters), {dataset}, tau {cfg.tau}, "
            + (f"outer lr {cfg.outer_lr}, momentum {cfg.outer_momentum}, delay {cfg.outer_delay}"
               if algo.outer else f"alpha {cfg.alpha:.4g} (beta {len(self.leaders) * cfg.alpha:.3g})")
            + (", overlapped exchanges" if cfg.overlap_exchange else "")
        )
        self.worker: AsyncWorker | None = None
        self.evaluations = saved["evaluations"] if saved and topo.role == "tester" else 0
        if topo.role == "worker":
            if optimizer is None:
                raise ValueError("a worker needs an optimizer: AsyncTraining(comm, model, optimizer, ...)")
            group = None if self.group_comm is None else GroupRounds(
                self.group_comm, self.flat, cfg.group_tau or cfg.tau, cfg.tau, ctx.transfer, cfg.worker_timeout)
            if group is not None and not group.leads:
                self.worker = GroupMember(ctx, self.flat, optimizer, group)
            else:
                endpoint = WorkerEndpoint(comm, self.live, topo.server_rank, topo.server_ranks, self.spares)
                self.worker = AsyncWorker(ctx, self.flat, endpoint, optimizer,
                                          lambda step, state: _save_rank(ctx, step, state), saved, group)
                self.worker.rest = self.rest
            if group is not None:  # the leader's parameters and position: the group's starting point
                self.worker.position = group.start(self.worker.position)
        self._fault = faults.from_env(ctx.rank)  # injected faults (tests): once per step, as in the loop
        self.stopped = False
        self.finished = False
        self.summary: dict | None = None  # on the tester, once finished

    def _start(self, ctx: RunContext) -> dict | None:
        """The start on ``ctx.comm``: the communicators, the server, the center broadcast to
        every rank; returns this rank's saved state (a resumed run) or None. Collective;
        under ULFM it ends in a barrier, so that a death anywhere in it fails on every rank."""
        cfg, comm, topo = ctx.cfg, ctx.comm, ctx.topo
        self.ctx = ctx
        self.live = comm.Dup()  # liveness traffic (heartbeats, DROPPED, wake-up) never meets a training receive
        # (ULFM, --servers S, uncompressed) where rank 0 would serve a shard whose server died (.shards)
        self.spares = {k: comm.Dup() for k in topo.server_ranks[1:]} if ft.enabled() and \
            wire_format(cfg.exchange_dtype, cfg.topk_fraction) in (torch.float32, torch.float16, torch.bfloat16) \
            else {}
        self.group_comm, self.leaders = make_groups(comm, topo.worker_ranks, cfg.groups)
        member = self.group_comm is not None and self.group_comm.Get_rank() != LEADER
        # (a member writes no checkpoint file: it starts from its leader's state)
        saved = self._resumed(member) if ctx.resume else None
        if topo.role in ("server", "shard"):
            self.server = self._make_server(saved)
        # The center, each shard from its server: everyone's starting point (a resumed
        # server holds only its own shard of it)
        for root, (a, b) in zip(topo.server_ranks, shard_bounds(self.flat.numel, topo.servers)):
            start = MPIBuffer(self.flat.data[a:b], ctx.transfer)
            start.before_send()
            comm.Bcast(start.mpi, root=root)
            start.after_recv()
        if ft.enabled():
            comm.Barrier()  # (a rank past the broadcast while another failed in it would go on alone)
        return saved

    def _without_the_dead(self, ctx: RunContext) -> RunContext:
        """(ULFM) A process died in the start: the survivors shrink the communicator and
        start again without it, ranks renumbered in order (so the server ranks and the tester
        keep their roles); a dead server or tester ends the run. The summary lists the dead
        (``lost_at_start``, by their rank as the run started)."""
        from mpi_easgd.topology import Topology

        if self.server is not None:
            self.server.liveness.stop()
            self.server = None
        new, survivors, _ = ft.shrink(ctx.comm, self.world_ranks[ctx.comm.Get_rank()])
        dead = [r for r in self.world_ranks if r not in survivors]
        topo = ctx.topo
        vital = [f"{'tester' if i == topo.tester_rank else 'server'} rank {r}"
                 for i, r in enumerate(self.world_ranks) if r in dead and i not in topo.worker_ranks]
        if vital:
            raise PeerLost(f"{', '.join(vital)} died at the start, before training; the run cannot go on without "
                           f"it: start it again")
        kept = [self.world_ranks.index(r) for r in survivors]
        self.world_ranks, self.lost_at_start = survivors, self.lost_at_start + dead
        topo = Topology.build(new.Get_size(), new.Get_rank(), ctx.cfg.algo, ctx.cfg.servers)
        ctx.log.warn(f"worker rank(s) {dead} died at the start, before training; starting again with "
                     f"{topo.num_workers} worker(s), the ranks after them renumbered (--on-worker-loss "
                     f"{ctx.cfg.on_worker_loss})")
        return dataclasses.replace(ctx, comm=new, topo=topo, hosts=tuple(ctx.hosts[i] for i in kept)
                                   if ctx.hosts else ctx.hosts)

    def _resumed(self, member: bool) -> dict | None:
        """This rank's state in the checkpoint to resume (None: a group's member, which
        takes its leader's). Written by another number of ranks (:meth:`Topology.saved_by`),
        a worker starts from the center, at the epoch the slowest old worker was in, and
        (with a dataset this run knows) that epoch's unseen samples are re-sharded over the
        new workers (:attr:`rest`)."""
        ctx, topo = self.ctx, self.ctx.topo
        if member:
            return None
        old_size = checkpoint.read_manifest(ctx.resume)["world_size"]
        source = topo.saved_by(old_size)
        if source is not None:
            return saved_state(ctx.resume, source)
        self.rest, epoch = _async_rest(ctx, old_size)
        return {"position": dict(epoch=epoch, step=self.rest.first if self.rest is not None else 0)}

    # ---- who this rank is ------------------------------------------------------------

    @property
    def role(self) -> str:
        """``server``, ``worker`` or ``tester``."""
        return self.ctx.topo.role

    @property
    def trains(self) -> bool:
        """Whether this rank runs the training loop (a worker)."""
        return self.worker is not None

    @property
    def worker_index(self) -> int:
        """This worker's shard among the workers (0 .. num_workers - 1; -1 elsewhere)."""
        return self.ctx.topo.worker_index

    @property
    def num_workers(self) -> int:
        return self.ctx.topo.num_workers

    @property
    def position(self) -> Position:
        """Where this worker is (epoch, step within it, local steps...); a resumed run
        starts where its checkpoint was taken."""
        return self.worker.position if self.worker is not None else Position()

    # ---- the worker's loop -----------------------------------------------------------

    def epochs(self) -> Iterator[int]:
        """The epochs left to train (from the resumed one to ``epochs``); nothing on the
        server and the tester, and nothing more once training must stop."""
        if self.worker is None:
            return
        pos = self.position
        for epoch in range(pos.epoch, self.ctx.cfg.epochs):
            if self.stopped:
                return
            pos.epoch = epoch
            yield epoch
            if self.stopped:
                return
            pos.epoch, pos.step, pos.stats = epoch + 1, 0, EpochStats()

    def batches(self, items: Iterable) -> Iterator:
        """``items`` (this epoch's batches), without those a resumed run took already."""
        skip = self.position.step
        for n, item in enumerate(items):
            if n >= skip:
                yield item

    def step(self, loss: torch.Tensor | None = None, samples: int | None = None) -> bool:
        """After ``loss.backward()``: exchange with the server every ``tau`` steps, then
        take the optimizer's step (skipped when ``loss`` or a gradient is not finite, or an
        error with ``on_nonfinite="stop"``), and answer the server's commands (a
        checkpoint). False when training must stop: a stop signal, or this worker was
        dropped; leave the loop then."""
        worker, pos = self.worker, self.position
        if self._fault:
            self._fault.at_step(pos.t)
        self.flat.gather_grads()  # (zero_grad(set_to_none=True) lets backward allocate new gradients)
        has_grad = loss is None or finite(loss.detach(), self.flat.grad)
        if not has_grad:
            if self.ctx.cfg.on_nonfinite == "stop":
                raise NonFiniteError(f"non-finite loss or gradient on rank {self.ctx.rank}; lower the learning "
                                     f"rate or use on_nonfinite='skip'")
            pos.skipped += 1
        worker.step(pos, has_grad)
        pos.step, pos.t = pos.step + 1, pos.t + 1
        pos.samples += self.samples_per_step if samples is None else samples
        if loss is not None and has_grad:
            pos.stats.loss_sum += float(loss.detach())
            pos.stats.batches += 1
        action = worker.boundary(pos)
        if Action.SAVE in action:
            worker.save(pos)
        self.stopped = Action.STOP in action
        return not self.stopped

    # ---- the end ---------------------------------------------------------------------

    def finish(self, stopped: bool | None = None) -> dict | None:
        """This rank's end of the run: a worker's final exchange and statistics; the
        server's and the tester's whole role (they return once every worker is done).
        Returns the run's summary on the tester (also written to ``summary.json``), None
        elsewhere. Raises :class:`~mpi_easgd.runtime.control.Preempted` on every rank when a
        stop signal ended training (its checkpoint is written)."""
        if self.finished:
            return self.summary
        self.finished = True
        if self.server is not None:
            self._serve()
        elif self.worker is not None:
            self._work(self.stopped if stopped is None else stopped)
        else:
            self.summary = self._test()
            session.close_run(self.ctx, self.summary)
            if self.ctx.identity is not None:  # a spare standing in for the tester: the server lets it go
                self.live.Disconnect()
                self.ctx.comm.Disconnect()
        return self.summary

    def close(self) -> None:
        """Stop the worker's watch on the server (after an error ended its loop)."""
        if self.worker is not None:
            self.worker.close()

    def __enter__(self) -> AsyncTraining:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        """Finish, and turn what ends a run into the process's exit as the command line
        does: one line, the other ranks ended, 75 after a stop signal's checkpoint (the
        process ends there, see :func:`~mpi_easgd.runtime.session.leave`)."""
        if exc is None:
            try:
                self.finish()
                ft.finalize_at_exit(0)  # (under ULFM: MPI_Finalize may wait on a process that died)
                return False
            except BaseException as error:  # noqa: BLE001 - every way out gets its status
                exc = error
        status = session.exit_status(self.ctx.comm, exc, resume_hint="resume='auto'")
        session.leave(status)
        return False  # (not reached)

    # ---- the roles -------------------------------------------------------------------

    def _make_server(self, saved: dict | None) -> Server:
        ctx, cfg, topo = self.ctx, self.ctx.cfg, self.ctx.topo

        members = sorted(set(topo.worker_ranks) - set(self.leaders))  # (--groups) no file: they take their leader's

        def commit(step: int, extra: dict, workers_written: bool) -> Path:
            ckpt = checkpoint.step_dir(ctx.run_dir, step)
            if not workers_written or not _save_rank(ctx, step, server.state_dict()):
                checkpoint.discard(ckpt)  # every write is over: the workers wait for the server
                raise checkpoint.CheckpointFailed(ckpt)
            # The tester's only state is how many snapshots it has been sent (it evaluates each).
            checkpoint.save_rank(ckpt, topo.tester_rank, {"evaluations": server.feed.snapshots})
            checkpoint.commit(ctx.run_dir, ckpt, dict(config=dataclasses.asdict(cfg), world_size=topo.world_size,
                                                      updates=server.updates, group_members=members,
                                                      wall_seconds=time.perf_counter() - ctx.started, **extra))
            return ckpt

        rule = server_rule(cfg.algo, cfg.alpha, cfg.outer_lr, cfg.outer_momentum, cfg.outer_delay, cfg.max_staleness,
                           cfg.outer_quorum)
        start, stop = shard_bounds(self.flat.numel, topo.servers)[topo.rank]  # this rank's shard of the center
        per_exchange = cfg.tau * self.samples_per_step * topo.num_workers / len(self.leaders)  # (a group's, on average)
        options = dict(test_every=cfg.test_every, samples_per_exchange=round(per_exchange),
                       audit=cfg.audit, peer_timeout=cfg.worker_timeout, checkpoint_every=cfg.checkpoint_every,
                       wire=wire_format(cfg.exchange_dtype, cfg.topk_fraction), wait_replies=not cfg.overlap_exchange)
        if topo.role == "shard":
            server = ShardServer(ctx.comm, self.live, self.flat.data[start:stop], rule, self.leaders,
                                 topo.tester_rank, save=lambda step, extra, written: _save_rank(
                                     ctx, step, server.state_dict()), **options)
            if saved is not None:
                server.load_state_dict(saved)
            return server
        spares = None
        if cfg.on_worker_loss == "respawn":
            # The command line's spares run python -m mpi_easgd.ps.join; a script's rerun the
            # script itself, which becomes the replacement in this class's constructor.
            script = None if ctx.info is not None else newcomers.rerun_command(Path(sys.argv[0]).resolve(),
                                                                               sys.argv[1:])
            setup = dict(config=dataclasses.asdict(cfg), run_dir=str(ctx.run_dir), world_size=topo.world_size,
                         cwd=os.getcwd(), crowded=mpienv.oversubscribed(extra=1),
                         clock=time.time() - (time.perf_counter() - ctx.started))  # (the run's wall clock)
            spares = Spares(setup, script)
        doorway = None
        if cfg.accept_joiners:
            from mpi_easgd.ps.joiners import Doorway

            joining = dict(config=dataclasses.asdict(cfg), run_dir=str(ctx.run_dir), world_size=topo.world_size,
                           cwd=os.getcwd(), crowded=False)

            def doorway(wake):
                return Doorway(ctx.run_dir, joining, wake, self.samples_per_epoch or 1)
        shards = None
        if topo.servers > 1:
            def take_over(k: int) -> tuple[ShardServer, str]:
                """Shard k's server, on rank 0, from its newest replica (its server rank died)."""
                latest = checkpoint.latest(ctx.run_dir)
                saved = checkpoint.load_rank(latest, k) if latest is not None else None
                a, b = shard_bounds(self.flat.numel, topo.servers)[k]
                spare = self.spares[k]
                # (before the first checkpoint: the center as it started, which the start's broadcast left here)
                shard = ShardServer(spare, spare, self.flat.data[a:b].clone(), server_rule(
                    cfg.algo, cfg.alpha, cfg.outer_lr, cfg.outer_momentum, cfg.outer_delay, cfg.max_staleness,
                    cfg.outer_quorum), self.leaders, topo.tester_rank, save=lambda step, extra, written:
                    checkpoint.try_save_rank(checkpoint.step_dir(ctx.run_dir, step), k, shard.state_dict()),
                    **dict(options, audit=False))
                if saved is not None:
                    shard.load_state_dict(saved)
                return shard, str(latest) if latest is not None else "the center it started from"

            shards = ShardServers(ctx.comm, topo.server_ranks[1:], cfg.worker_timeout, self.spares,
                                  take_over if self.spares else None)
        server = Server(ctx.comm, self.live, self.flat.data[start:stop], rule, self.leaders, topo.tester_rank,
                        save=commit, policy=loss_policy(cfg.on_worker_loss, spares), shards=shards, doorway=doorway,
                        **options)
        if saved is not None:
            server.load_state_dict(saved)  # the center is the starting point again
        return server

    def _serve(self) -> None:
        ctx, cfg, server, topo = self.ctx, self.ctx.cfg, self.server, self.ctx.topo
        audit = ctx.run_dir / ("audit.npz" if topo.servers == 1 else f"audit-shard{topo.rank}.npz")
        if isinstance(server, ShardServer):  # its shard and counters go to rank 0 at the end
            server.run()
            if server.audit is not None:
                server.audit.write(audit, server.versions.rule, server.center)
            return
        shards = []
        try:
            server.run()
            if server.shards is not None:  # the whole center, for center.pt and the summary
                shards = server.shards.end(self.flat.data, shard_bounds(self.flat.numel, topo.servers))
        finally:  # the server owns the center: keep it even if a peer was lost at the end
            checkpoint.save_model(self.model, ctx.run_dir / "center.pt")
        stats = server.stats()
        stats.shards = shards
        stats.takeovers = server.shards.takeover_rows() if server.shards is not None else []
        stats.lost_at_start = self.lost_at_start
        # every worker's statistics, for the tester (a replacement's come through its intercommunicator)
        stats.relayed = {**_gather_workers(ctx.comm, topo, server.roster, stats, cfg.worker_timeout),
                         **server.policy.relayed(server.roster, cfg.worker_timeout)}
        if server.audit is not None:
            server.audit.write(audit, server.versions.rule, server.center)
        # Sent once everything is on disk: the tester may end the job after its summary.
        if server.feed.lost or not _hand_to_tester(server.feed.comm, server.feed.tester, stats, cfg.worker_timeout):
            server.feed.lost = True
            self.summary = self._stand_in(stats, server.feed.snapshots)
        server.feed.let_go()  # (a replacement tester's intercommunicators)
        if set(stats.lost_workers) - set(stats.dead_workers):
            # A dropped worker that is only hung may still send (it wakes up and exchanges before it
            # learns it was dropped): MPICH fails an assertion when MPI_Finalize meets such a message.
            # The tester ends the job once the summary is written (exit 3, or 75 when stopped).
            time.sleep(cfg.worker_timeout)
        if stats.stopped:
            raise Preempted(Path(stats.checkpoint))

    def _work(self, stopped: bool) -> None:
        ctx, worker = self.ctx, self.worker
        try:
            stats, step, stopped = worker.finish(worker.position, stopped)
        except WorkerDropped:
            worker.close()
            idle_forever(ctx.rank)
        finally:
            worker.close()
        _send_stats(ctx.comm, stats, ctx.topo.server_rank, ctx.cfg.worker_timeout)
        if ctx.identity is not None:  # a replacement or a joiner: the server disconnects once it has the statistics
            for inbox in (worker.endpoint.liveness, worker.endpoint.inbox):
                inbox.close()
            self.live.Disconnect()
            ctx.comm.Disconnect()
        if stopped:
            raise Preempted(checkpoint.step_dir(ctx.run_dir, step))

    def _stand_in(self, stats: ServerStats, evaluations: int) -> dict:
        """(ULFM) The tester died and the run went on without evaluations: rank 0 evaluates
        the final center itself (with ``evaluate``, where it was given) and writes the
        final metrics row and the summary, which says so (``tester_lost``)."""
        from mpi_easgd.runtime.metrics import RunLog

        ctx, cfg, topo = self.ctx, self.ctx.cfg, self.ctx.topo
        log = RunLog(ctx.run_dir, vars(cfg), cfg.progress, cfg.tensorboard, started=ctx.started,
                     resumed_at=1 << 62)  # (the tester's rows stay)
        log.warn(f"the tester (rank {topo.tester_rank}) died; the run went on without evaluations, and rank "
                 f"{topo.rank} evaluates the final center and writes the summary")
        samples = self.server.roster.samples(self.server.feed.samples_per_exchange)
        row = evaluation_row(self.model, self.evaluate or (lambda model: {}), stats.updates, samples,
                             self.samples_per_epoch)
        log.log_eval(**row)
        summary = summarise(cfg, self.dataset, topo.world_size, topo.num_workers, topo.worker_ranks, stats,
                            TesterStats(row, evaluations + 1), {}, self.samples_per_step)
        summary["tester_lost"] = topo.tester_rank
        session.write_summary(ctx, log, summary)
        return summary

    def _test(self) -> dict:
        ctx, cfg, topo = self.ctx, self.ctx.cfg, self.ctx.topo
        final = run_tester(ctx.comm, self.flat, self.evaluate or (lambda model: {}), topo.server_rank, ctx.log,
                           ctx.transfer, self.evaluations, self.samples_per_epoch, topo.server_ranks, self.spares)
        server = _gather_stats(ctx.comm, self.live, topo, cfg.worker_timeout)
        if final.pending is not None:  # a shard server died before its piece of the final snapshot came:
            # the whole final center is in center.pt by now (rank 0 writes it before the statistics)
            self.model.load_state_dict(torch.load(ctx.run_dir / "center.pt", map_location=self.flat.device,
                                                  weights_only=True))
            row = evaluation_row(self.model, self.evaluate or (lambda model: {}), *final.pending,
                                 self.samples_per_epoch)
            ctx.log.log_eval(**row)
            final = TesterStats(row, final.evaluations + 1)
        if ft.enabled():
            ctx.comm.send(None, dest=topo.server_rank, tag=Tag.GATHERED)
        if server.stopped:
            raise Preempted(Path(server.checkpoint), server.lost_workers)
        summary = summarise(cfg, self.dataset, topo.world_size, topo.num_workers, topo.worker_ranks, server, final,
                            {}, self.samples_per_step)
        note = nonfinite_note(summary["nonfinite_skipped"], sum(w.get("steps", 0) for w in summary["per_worker"]))
        if note:
            ctx.log.warn(note)
        return summary


def _open(comm: MPI.Comm, model: nn.Module, settings: dict) -> RunContext:
    """A script's run, validated and opened as the command line opens its own (one line
    and exit 2 on every rank for a bad setting)."""
    from mpi_easgd.config import Config, ConfigError
    from mpi_easgd.runtime.checkpoint import CheckpointError
    from mpi_easgd.runtime.control import StopRequest
    from mpi_easgd.topology import Topology
    from mpi_easgd.transfer import cuda_aware

    stop = StopRequest().install()  # from here on, SIGTERM/SIGUSR1 mean "checkpoint and stop"
    rank, size = comm.Get_rank(), comm.Get_size()
    error = cfg = resume = manifest = topo = None
    try:
        settings = dict(settings)
        values = {"model": settings.pop("model_name", type(model).__name__), "dataset": "custom", **settings}
        algo = values.get("algo")
        if isinstance(algo, type):  # a rule class: by its import path
            values["algo"] = f"{algo.__module__}:{algo.__qualname__}"
        cfg = Config.from_mapping(values, "AsyncTraining(...)")
        cfg.validate()
        topo = Topology.build(size, rank, cfg.algo, cfg.servers)
        if not topo.is_async:
            raise ConfigError(f"AsyncTraining runs the asynchronous algorithms; for {cfg.algo} use the "
                              f"synchronous classes (AllReduceSGD, AllReduceEA, AllReduceDiLoCo)")
        unresolved, cfg = cfg, cfg.resolve(topo.num_workers)
        resume, manifest = session.check_run(cfg, topo, rank, size, unresolved)  # (it may resume at another size)
    except (ConfigError, CheckpointError, OSError) as exc:
        error = str(exc)
    try:
        run_dir, hosts = session.agree(comm, error, cfg, resume, manifest)
    except (session.BadInput, session.NothingToDo) as exc:
        session.leave(session.exit_status(comm, exc))
    device = next(model.parameters()).device
    transfer = "direct" if device.type == "cpu" or cuda_aware(cfg.cuda_aware)[0] else "staged"
    log, started = session.open_log(cfg, topo, run_dir, resume, manifest, [])
    return RunContext(cfg, comm, topo, None, device, log, run_dir, stop, resume, transfer, started, hosts=hosts)


def idle_forever(rank: int) -> None:
    """A dropped worker no longer counts, but cannot leave an MPI job: it waits, off the
    CPU, to be ended with it."""
    say_dropped(rank)
    while True:
        time.sleep(60)


def _save_rank(ctx: RunContext, step: int, state: dict) -> bool:
    """Write this rank's file of checkpoint ``step``; False (and said why) if it failed."""
    return checkpoint.try_save_rank(checkpoint.step_dir(ctx.run_dir, step), ctx.topo.rank, state)


def _async_rest(ctx: RunContext, old_size: int) -> tuple[Rest | None, int]:
    """(A resume at another size) the epoch the slowest old worker was in, and its samples
    that no old worker had taken, split over this run's workers (None without a dataset
    this run reads: an API user's loop reads its own data). An old worker already in a
    later epoch had taken all of it."""
    from mpi_easgd.data import shard_loader, steps_per_epoch
    from mpi_easgd.data.rest import consumed, old_orders, rest_of_epoch, unseen
    from mpi_easgd.topology import Topology

    cfg, topo = ctx.cfg, ctx.topo
    old = Topology.build(old_size, 0, cfg.algo, cfg.servers)
    states = [saved_state(ctx.resume, rank, mmap=True) for rank in old.worker_ranks]  # (their models unread)
    marks = [(int(s["position"].get("epoch", 0)), int(s["position"].get("step", 0))) for s in states]
    epoch = min(e for e, _ in marks)
    if ctx.info is None:
        return None, epoch
    # (the old run's rest, if it was in one: the same in every old worker's file)
    old_rest = next((r for r in (Rest.from_state(s.get("rest")) for s in states) if r is not None), None)
    b, even = cfg.batch_size, not cfg.uneven
    orders = old_orders(lambda i: shard_loader(ctx.info, "train", i, old.num_workers, batch_size=b, seed=cfg.seed,
                                               even=even, prefetch=0), old_rest, epoch, old.num_workers, cfg.seed)
    taken = [len(order) if e > epoch else consumed([order], step, old_rest, epoch, b)[0]
             for (e, step), order in zip(marks, orders)]
    steps = max(steps_per_epoch(ctx.info.sizes["train"], topo.num_workers, b, even))
    return rest_of_epoch(epoch, unseen(orders, taken), topo.num_workers, steps, b), epoch


def evaluations_before(resume: Path) -> int:
    """The tester's evaluations in the run that wrote checkpoint ``resume`` (its last rank)."""
    return int(saved_state(resume, checkpoint.read_manifest(resume)["world_size"] - 1)["evaluations"])


def saved_state(resume: Path, rank: int, mmap: bool = False) -> dict:
    """This rank's state in checkpoint ``resume``; for a worker lost in that run, only the
    position from which it rejoins (its parameters start from the center). ``mmap``: the
    tensors are mapped, read only where used."""
    rejoin = checkpoint.read_manifest(resume).get("rejoin", {}).get(str(rank))
    if rejoin is not None:
        return {"position": rejoin}
    return checkpoint.load_rank(resume, rank, mmap=mmap)


def _hand_to_tester(comm: MPI.Comm, tester: int, stats: ServerStats, timeout: float) -> bool:
    """Send the tester (rank ``tester`` of ``comm``: a replacement's intercommunicator, or
    the run's) every role's statistics and (ULFM) wait for its word that it has them:
    under ULFM a send to a dead tester may complete, and nothing else would say that the
    summary is lost. False if it died."""
    _send_stats(comm, stats, tester, timeout)
    if not ft.enabled():
        return True
    arrived = False
    with ft.survivable() as death:
        arrived, _ = receive_object(comm, tester, Tag.GATHERED, time.monotonic() + timeout)
    if death or ft.is_dead(comm, tester):
        return False
    if not arrived:
        raise PeerLost(f"the tester (rank {tester}) did not answer within --worker-timeout {timeout:g}s; "
                       f"training finished, the center is saved as center.pt and in {stats.checkpoint}, but the "
                       f"run's summary is not written")
    return True


def _gather_workers(comm: MPI.Comm, topo, roster, server: ServerStats, timeout: float) -> dict[int, WorkerStats]:
    """On rank 0, after the run: the statistics of every worker still in it, and of each
    late joiner, which is then let go (a dead worker's replacement sends its own through the
    server's policy)."""
    workers = {}
    joiners = {r.rank: r.link for r in roster if r.join is not None and r.rank not in server.lost_workers}
    for rank in [*topo.worker_ranks, *joiners]:
        if rank in server.lost_workers or rank in server.dead_workers:
            continue
        where, source = (joiners[rank].comm, 0) if rank in joiners else (comm, rank)
        with ft.survivable() as death:
            arrived, stats = receive_object(where, source, Tag.STATS, time.monotonic() + timeout)
        if rank in joiners:
            joiners[rank].live.Disconnect()
            joiners[rank].comm.Disconnect()
        if death:
            continue  # (ULFM: it died after its last word; its row keeps the server's counts)
        if not arrived:
            raise PeerLost(f"worker rank {rank} did not send its run statistics within --worker-timeout {timeout:g}s; "
                           f"the checkpoint is complete, the run's summary is not written")
        workers[rank] = stats
    return workers


def _send_stats(comm: MPI.Comm, stats: WorkerStats | ServerStats, tester: int, timeout: float) -> None:
    sent = False
    with ft.survivable() as death:  # (ULFM) it died: rank 0 finds out (_hand_to_tester)
        request = comm.isend(stats, dest=tester, tag=Tag.STATS)
        sent = wait_politely([request], time.monotonic() + timeout)
    if death:
        return
    if not sent:
        raise PeerLost(f"tester rank {tester} did not take the run statistics within --worker-timeout "
                       f"{timeout:g}s; the checkpoint is complete, the run's summary is not written")


def _gather_stats(comm: MPI.Comm, live: MPI.Comm, topo, timeout: float) -> ServerStats:
    """Every role's statistics, on the tester: the server's, with every worker's in it."""
    inbox = Inbox(live, topo.server_rank)  # the server's heartbeats while it writes the checkpoint
    guard = Watchdog(comm, timeout, lambda rank: f"rank {rank} (its run statistics)",
                     record=lambda rank: f"tester: the statistics of rank {rank}",
                     heard=lambda rank: inbox.heard() if rank == topo.server_rank else 0.0).start()
    guard.expect(topo.server_rank)
    server: ServerStats = comm.recv(source=topo.server_rank, tag=Tag.STATS)
    guard.release(topo.server_rank)
    guard.stop()
    inbox.close()
    return server


__all__ = ["AsyncTraining"]
