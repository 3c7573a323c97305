"""The ``peer`` role: synchronous training with AllReduceSGD, AllReduceEA or AllReduceDiLoCo.

:class:`Peer` adapts the seed's API to the training loop (:func:`mpi_easgd.runtime.loop.train`):
each step is one ``sum_and_normalize_gradients`` (sgd) or ``average_parameters`` (ea,
diloco), each epoch ends with ``synchronize_parameters`` / ``synchronize_center`` and an
evaluation (ea, diloco: of the center).
Every rank evaluates its own slice of the test set; the sums are Allreduced, so every rank
knows the metrics and one rank logs them. Checkpoints hold every rank's own state (EA
ranks differ); a resumed run continues from the saved step with the same batches and ends
bitwise equal to an uninterrupted one.

With ``--on-rank-loss shrink`` under ULFM (``mpirun --with-ft ulfm``, :mod:`mpi_easgd.runtime.ft`)
a rank that dies does not end the run (:func:`shrink`): the survivors revoke the
communicator (so that every rank's pending collective fails too), shrink it to
themselves, and agree all-or-nothing on the step in progress: the state of the survivor
that got furthest (a step whose reduction completed anywhere, completed everywhere) goes
to all of them. The epoch's samples not taken yet are then re-sharded over the survivors
(:mod:`mpi_easgd.data.rest`: each is taken once) and training goes on; their parameters
stay identical. When rank 0, which writes the run's log and summary, dies, the new rank 0
takes them over. A checkpoint resumes at another size in the same way (:func:`resume`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from mpi_easgd import registry
from mpi_easgd.collectives.base import PeriodicRounds
from mpi_easgd.data import rank_batch, shard_loader, steps_per_epoch
from mpi_easgd.data.rest import Resharded, Rest, consumed, old_orders, rest_of_epoch, unseen
from mpi_easgd.models import build_model
from mpi_easgd.runtime import checkpoint, faults, ft
from mpi_easgd.runtime.context import RunContext
from mpi_easgd.runtime.control import Control, Preempted
from mpi_easgd.runtime.loop import Action, Position, evaluate, make_optimizer, nonfinite_note, train
from mpi_easgd.runtime.metrics import goodput, run_summary, traffic_summary
from mpi_easgd.tasks import task


class Peer:
    """One rank of a synchronous run, as the training loop sees it (see the module docstring)."""

    def __init__(self, ctx: RunContext) -> None:
        cfg, comm = ctx.cfg, ctx.comm
        self.ctx = ctx
        # The global batch the run started with (kept at another size with --keep-global-batch)
        self.global_batch = cfg.batch_size * comm.Get_size()
        self.rest: Rest | None = None  # the current epoch's rest, re-sharded over these ranks (data.rest)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, ctx.info.shape, ctx.info.num_classes).to(ctx.device)
        self.optimizer = make_optimizer(cfg, self.model)
        # A rank that hangs or dies mid-collective ends the job after --worker-timeout.
        guard = dict(transfer=ctx.transfer, timeout=cfg.worker_timeout, on_timeout="abort")
        self.algo = registry.lookup(cfg.algo).load().from_config(comm, cfg, **guard)
        # AllReduceEA and AllReduceDiLoCo average parameters and keep a center; AllReduceSGD
        # averages gradients.
        self.periodic = isinstance(self.algo, PeriodicRounds)
        self.algo.synchronize_parameters(self.model)
        self.flat = self.algo.flat(self.model)
        self.exchange_origin = self.algo.exchange_seconds  # (the start's broadcast is not training)
        self.train_seconds = 0.0  # this rank's: its epochs' loops and their closing synchronization
        self.control = Control(comm, ctx.stop, cfg.checkpoint_every)
        self.fault = faults.from_env(ctx.rank)
        # (--on-rank-loss shrink) who is in the run, by rank at its start: who died is said in those
        self.members = comm.allgather(ctx.rank) if cfg.on_rank_loss == "shrink" else []
        self.test = shard_loader(ctx.info, "test", comm.Get_rank(), comm.Get_size(), batch_size=512,
                                shuffle=False, even=False)
        self.totals = np.zeros(4)  # train samples (all ranks), train seconds, samples lost, deaths (goodput)
        self.last: dict = {}  # the last evaluation
        self.checkpoint: Path | None = None  # the last one written

    # ---- the loop's interface --------------------------------------------------------

    def step(self, pos: Position, has_grad: bool) -> None:
        if not self.periodic:
            if self.algo.sum_and_normalize_gradients(self.model, has_data=has_grad):
                self.optimizer.step()  # no rank steps when no rank had a usable gradient
        else:
            if has_grad:
                self.optimizer.step()
            self.algo.average_parameters(self.model)

    def boundary(self, pos: Position) -> Action:
        save, stop = self.control.poll(self.global_step(pos))
        return (Action.SAVE if save else Action.NONE) | (Action.STOP if stop else Action.NONE)

    def save(self, pos: Position, finished: bool = False) -> None:
        ctx, comm, rank = self.ctx, self.ctx.comm, self.ctx.comm.Get_rank()
        ckpt = checkpoint.step_dir(ctx.run_dir, self.global_step(pos))
        written = checkpoint.try_save_rank(ckpt, rank, self.state_dict(pos))
        if self.fault:
            self.fault.at("save", self.global_step(pos))  # (injected: a death during a checkpoint)
        # Every rank's file is on disk before the checkpoint is marked complete; if one is
        # not, every write is over before the incomplete checkpoint is removed.
        if not comm.allreduce(written, op=MPI.LAND):
            if rank == 0:
                checkpoint.discard(ckpt)
            comm.Barrier()
            raise checkpoint.CheckpointFailed(ckpt)
        if rank == 0:
            checkpoint.commit(ctx.run_dir, ckpt, dict(
                config=dataclasses.asdict(ctx.cfg), world_size=comm.Get_size(), epoch=pos.epoch, step=pos.step,
                finished=finished, wall_seconds=time.perf_counter() - ctx.started))
        self.checkpoint = ckpt

    def end_epoch(self, pos: Position) -> None:
        started = time.perf_counter()
        if self.fault:
            self.fault.at("sync", pos.epoch + 1)
        if not self.periodic:
            self.algo.synchronize_parameters(self.model)
        else:
            self.algo.synchronize_center(self.model)
        if self.fault:
            self.fault.at("eval", pos.epoch + 1)
        stats, comm = pos.stats, self.ctx.comm
        self.train_seconds += stats.seconds + time.perf_counter() - started
        kind = task(self.ctx.cfg.task)
        with self.evaluated():
            loss, correct, count = evaluate(self.model, self.test.epoch(0), self.ctx.device, kind)
        sums = np.array([loss, correct, count, stats.loss_sum, stats.batches, stats.samples])
        comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
        self.totals[:2] += (sums[5], comm.allreduce(stats.seconds, op=MPI.MAX))
        self.last = dict(epoch=pos.epoch + 1, step=self.global_step(pos), samples=int(self.totals[0]),
                         train_loss=sums[3] / max(sums[4], 1), **kind.metrics(*sums[:3]))
        self.ctx.log.log_eval(**self.last)

    def traffic(self) -> dict:
        """Bytes and waiting of every rank (:func:`~mpi_easgd.runtime.metrics.traffic_summary`);
        a collective call. Counted since this segment's start (or since the last shrink)."""
        sent, received = self.algo.traffic()
        mine = dict(rank=self.ctx.rank, bytes_sent=sent, bytes_received=received,
                    exchange_seconds=self.algo.exchange_seconds - self.exchange_origin,
                    train_seconds=self.train_seconds)
        rows = self.ctx.comm.allgather(mine)
        return dict(traffic_summary(rows, self.algo.round_bytes(), "round"), per_rank=rows)

    def evaluate_start(self) -> None:
        """The evaluation before the first step, a fresh run's first metrics row (epoch 0,
        samples 0): where every run starts, sync and async alike (the async tester's first
        snapshot is the center before any training). ``train_loss`` is the model's loss
        on the first 512 training samples of each rank's shard."""
        kind, comm, device = task(self.ctx.cfg.task), self.ctx.comm, self.ctx.device
        probe = shard_loader(self.ctx.info, "train", comm.Get_rank(), comm.Get_size(), batch_size=512,
                             shuffle=False, even=False, prefetch=0)
        with self.evaluated():
            test = evaluate(self.model, self.test.epoch(0), device, kind)
            train = evaluate(self.model, itertools.islice(probe.epoch(0), 1), device, kind)
        sums = np.array([*test, train[0], train[2]])
        comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
        self.ctx.log.log_eval(epoch=0, step=0, samples=0, train_loss=sums[3] / sums[4], **kind.metrics(*sums[:3]))

    def evaluated(self):
        """The model as it is evaluated and saved: ea and diloco's center, else the parameters."""
        return self.algo.center_in(self.model) if self.periodic else contextlib.nullcontext(self.model)

    def state_dict(self, pos: Position) -> dict:
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    algorithm=self.algo.state_dict(), position=pos.state_dict(), totals=self.totals.tolist(),
                    torch_rng=torch.get_rng_state(), global_batch=self.global_batch,
                    rest=self.rest.state_dict() if self.rest is not None and self.rest.epoch == pos.epoch else None)

    @property
    def batch(self) -> int:
        """This rank's batch per step: ``--batch-size``, or with ``--keep-global-batch`` its
        share of the global batch the run started with (taken in micro-batches of
        ``--batch-size``)."""
        return self.batch_at(self.ctx.comm.Get_size())

    def batch_at(self, ranks: int) -> int:
        """A rank's batch in a run of ``ranks`` ranks (see :attr:`batch`)."""
        return rank_batch(self.global_batch, ranks) if self.ctx.cfg.keep_global_batch else self.ctx.cfg.batch_size

    @property
    def steps(self) -> int:
        """The steps every rank takes per epoch."""
        cfg = self.ctx.cfg
        return max(steps_per_epoch(self.ctx.info.sizes["train"], self.ctx.comm.Get_size(), self.batch,
                                   not cfg.uneven))

    # ---- set-up and end --------------------------------------------------------------

    def global_step(self, pos: Position) -> int:
        """Steps taken since the run began (what checkpoints and metrics rows are numbered
        by): ``epoch * steps + step``, until a change of size re-shards an epoch."""
        return pos.t

    def load_state_dict(self, state: dict) -> Position:
        self.model.load_state_dict(state["model"])  # copies into the flat buffer's views
        self.optimizer.load_state_dict(state["optimizer"])
        self.algo.load_state_dict(state["algorithm"])
        torch.set_rng_state(state["torch_rng"])
        self.totals[:len(state["totals"])] = state["totals"]
        self.global_batch = state.get("global_batch", self.global_batch)  # (earlier versions: resume() says)
        # (checkpoints of earlier versions kept the position's fields at the top level)
        pos = Position.from_state(state.get("position") or {k: state[k] for k in ("epoch", "step", "stats", "skipped")
                                                            if k in state})
        self.control.schedule.mark(self.global_step(pos), time.monotonic())
        return pos

    def save_final(self, pos: Position) -> None:
        """The final state, resumable with more --epochs, and (rank 0) the model that was
        evaluated last (ea: the center) as ``model.pt``, for use outside a checkpoint. Not
        again where it is complete already (a rank died after it: the survivors keep it);
        another checkpoint at its step (a periodic one, before the last epoch's end was
        redone by fewer ranks) is replaced whole."""
        ckpt, rank0 = checkpoint.step_dir(self.ctx.run_dir, self.global_step(pos)), self.ctx.comm.Get_rank() == 0
        written = rank0 and (ckpt / "manifest.json").is_file() and checkpoint.read_manifest(ckpt).get("finished")
        if rank0 and not written and (ckpt / "manifest.json").is_file():
            checkpoint.retract(self.ctx.run_dir, ckpt)  # (before the broadcast: no rank writes into it yet)
        if self.ctx.comm.bcast(written):
            self.checkpoint = ckpt
        else:
            self.save(pos, finished=True)
        if self.ctx.comm.Get_rank() == 0:
            with self.evaluated():
                checkpoint.save_model(self.model, self.ctx.run_dir / "model.pt")


def run_peer(ctx: RunContext) -> tuple[RunContext, dict]:
    """Train for ``cfg.epochs`` epochs; returns the run's context at its end (another
    communicator, and log owner, after ``--on-rank-loss shrink``) and its summary (identical
    on every rank). Raises :class:`Preempted` on every rank after the checkpoint a stop
    signal asked for."""
    cfg, info, log = ctx.cfg, ctx.info, ctx.log
    lost: list[int] = []  # world ranks that died (--on-rank-loss shrink)
    fault = faults.from_env(ctx.rank)
    if fault:
        fault.at_start()
    members = list(range(ctx.comm.Get_size()))  # (ranks as the run started: what a death is said in)
    while True:  # the start: the first broadcast and evaluation (a death there: start again without it)
        try:
            peer = Peer(ctx)
            pos = Position()
            if ctx.resume is None:
                peer.evaluate_start()
            else:
                pos = resume(ctx, peer)
            break
        except MPI.Exception as exc:
            if cfg.on_rank_loss != "shrink" or not ft.is_failure(exc):
                raise
            ctx, survivors = shrink_at_start(ctx, members)
            lost += [r for r in members if r not in survivors]
            members = survivors
    size = ctx.comm.Get_size()
    loader, steps = _loader(ctx, peer), peer.steps
    log.info(
        f"{cfg.algo}: {size} ranks, model {cfg.model} ({peer.flat.numel:,} parameters), "
        f"{info.name} {info.sizes['train']} train / {info.sizes['test']} test, "
        f"batch {peer.batch} per rank, {steps} steps per epoch, device {ctx.device}"
    )
    resumed_at_end = pos.epoch >= cfg.epochs
    while True:  # training, the final checkpoint and the summary's collectives (a death there: shrink)
        try:
            if train(peer, loader, pos, cfg, steps=peer.steps, rank=ctx.rank, device=ctx.device, log=log):
                raise Preempted(peer.checkpoint)
            if not resumed_at_end:  # (the final checkpoint itself needs no second copy)
                peer.save_final(pos)
            if peer.fault:
                peer.fault.at("end")
            summary = _summary(ctx, peer, pos, lost)
            break
        except MPI.Exception as exc:
            if cfg.on_rank_loss != "shrink" or not ft.is_failure(exc):
                raise
            ctx, peer, loader, pos, dead = shrink(ctx, peer, pos)
            lost += dead
    peer.algo.close()
    return ctx, summary


def _summary(ctx: RunContext, peer: Peer, pos: Position, lost: list[int]) -> dict:
    """The run's summary (collective: identical on every rank); ``lost``: the world ranks
    that died (``--on-rank-loss shrink``)."""
    cfg, comm = ctx.cfg, ctx.comm
    size = comm.Get_size()
    skipped = comm.allreduce(pos.skipped)
    traffic = peer.traffic()
    note = nonfinite_note(skipped, cfg.epochs * peer.steps * size)
    if note:
        ctx.log.warn(note)
    return run_summary(cfg, ctx.info.name, size, size, test=peer.last, train_samples=int(peer.totals[0]),
                       train_seconds=peer.totals[1], nonfinite_skipped=skipped,
                       resumed_from=str(ctx.resume) if ctx.resume else None,
                       **({"lost_ranks": lost} if cfg.on_rank_loss == "shrink" else {}),
                       **goodput(int(peer.totals[0]), peer.totals[2], int(peer.totals[3])),
                       **({"rounds": peer.algo.rounds} if peer.periodic else {}), **traffic)


def _loader(ctx: RunContext, peer: Peer) -> Resharded:
    """This rank's training shard over ``ctx.comm`` (in ``peer.rest``'s epoch: its slice of the rest)."""
    cfg, comm = ctx.cfg, ctx.comm
    loader = shard_loader(ctx.info, "train", comm.Get_rank(), comm.Get_size(), batch_size=peer.batch,
                          seed=cfg.seed, even=not cfg.uneven, augment=cfg.augment, prefetch=cfg.prefetch)
    return Resharded(loader, peer.rest, comm.Get_rank())


def resume(ctx: RunContext, peer: Peer) -> Position:
    """Load checkpoint ``ctx.resume`` into ``peer``; returns the position. Written by as
    many ranks, each rank loads its own file (by its rank in the world: the survivors of a
    death at the start keep theirs); by another number N, rank r loads rank ``r % N``'s
    (sgd: all alike; ea, diloco: the center alike, r's own parameters those of a rank
    that had them), and the epoch's unseen samples are re-sharded (:func:`regroup`)."""
    old = checkpoint.read_manifest(ctx.resume)["world_size"]
    state = checkpoint.load_rank(ctx.resume, ctx.rank % old)
    pos = peer.load_state_dict(state)
    if "global_batch" not in state:  # (written by an earlier version, at the batch it started with)
        peer.global_batch = ctx.cfg.batch_size * old
    if ctx.rank >= old and peer.periodic:
        peer.algo.abandon(keep_residuals=False)  # a copy of another rank's state: its residual is sent once
    peer.rest = regroup(ctx, peer, pos, old, Rest.from_state(state.get("rest")))
    size = ctx.comm.Get_size()
    resized = "" if old == size else f" (written by {old} ranks; the epoch's unseen samples re-sharded over {size})"
    ctx.log.info(f"resumed from {ctx.resume} at epoch {pos.epoch + 1}, step {pos.step}{resized}")
    return pos


def regroup(ctx: RunContext, peer: Peer, pos: Position, old_count: int, old_rest: Rest | None) -> Rest | None:
    """The rest of epoch ``pos.epoch`` over ``ctx.comm``'s ranks, when ``old_count`` ranks
    (in ``old_rest``, if the epoch was re-sharded before) reached ``pos``: the samples they
    had not taken yet, each to be taken once (:mod:`mpi_easgd.data.rest`); ``pos.step``
    moves to where the rest begins, taken in ``peer``'s batches. None: the layout is the
    usual one."""
    cfg, size, old_batch = ctx.cfg, ctx.comm.Get_size(), peer.batch_at(old_count)
    old_rest = old_rest if old_rest is not None and old_rest.epoch == pos.epoch else None
    if old_count == size or (pos.step == 0 and old_rest is None):
        return old_rest if old_count == size else None

    def old_loader(index: int):
        return shard_loader(ctx.info, "train", index, old_count, batch_size=old_batch, seed=cfg.seed,
                            even=not cfg.uneven, prefetch=0)

    orders = old_orders(old_loader, old_rest, pos.epoch, old_count, cfg.seed)
    taken = consumed(orders, pos.step, old_rest, pos.epoch, old_batch)
    rest = rest_of_epoch(pos.epoch, unseen(orders, taken), size, peer.steps, peer.batch)
    pos.step = rest.first
    # The epoch's statistics so far stand for the old ranks': summed over the new ones, they still add up
    scale, stats = old_count / size, pos.stats
    stats.samples, stats.batches, stats.loss_sum = (round(stats.samples * scale), round(stats.batches * scale),
                                                    stats.loss_sum * scale)
    return rest


def _on_survivors(ctx: RunContext, new: MPI.Comm, members: list[int], dead: list[int],
                  kept: int) -> RunContext:
    """The run's context on the survivors' communicator ``new``. When the rank that owns
    the run directory's log and summary (``members[0]``: rank 0 of the communicator that
    failed) died, the new rank 0 takes them over: metrics.csv keeps its rows up to step
    ``kept`` and goes on."""
    log = ctx.log
    if members[0] in dead and new.Get_rank() == 0:
        from mpi_easgd.runtime.metrics import RunLog

        cfg = ctx.cfg
        log = RunLog(ctx.run_dir, vars(cfg), cfg.progress, cfg.tensorboard, started=ctx.started, resumed_at=kept)
        log.warn(f"rank {members[0]}, which wrote the run's log and summary, died; rank {ctx.rank} writes them now")
    topo = dataclasses.replace(ctx.topo, rank=new.Get_rank(), world_size=new.Get_size())  # (who logs: rank 0)
    return dataclasses.replace(ctx, comm=new, identity=ctx.rank, topo=topo, log=log)


def shrink_at_start(ctx: RunContext, members: list[int]) -> tuple[RunContext, list[int]]:
    """``--on-rank-loss shrink``, when a rank died before training began (in the first
    broadcast or the first evaluation): the survivors start again without it, from the
    same state (a fresh run's is the seed's; a resumed one's is each rank's file).
    ``members``: the ranks (as the run started) on ``ctx.comm``; returns the new context
    and the survivors."""
    new, survivors, _ = ft.shrink(ctx.comm, ctx.rank)
    dead = [r for r in members if r not in survivors]
    # (a fresh run's rows are redone from its start; a resumed one's were cut at its checkpoint already)
    ctx = _on_survivors(ctx, new, members, dead, kept=-1 if ctx.resume is None else 1 << 62)
    ctx.log.warn(f"rank(s) {dead} died before training began; starting with {new.Get_size()} ranks, the data "
                 f"sharded over them (--on-rank-loss shrink)")
    return ctx, survivors


def shrink(ctx: RunContext, peer: Peer, pos: Position):
    """``--on-rank-loss shrink``, after a collective failed because a rank died: go on with
    the survivors (module docstring). Returns the new (context, peer, loader, position) and
    the world ranks that died. Another death meanwhile starts it over."""
    if peer.periodic:
        peer.algo.abandon()  # a round in flight died with the communicator

    def furthest_state(new: MPI.Comm):
        # Whoever got furthest (epoch, step; the lowest rank among equals) gives everyone its state.
        marks = new.allgather((pos.epoch, pos.step, -new.Get_rank()))
        furthest = -max(marks)[2]
        # (goodput) a step no rank got past is redone: the samples computed for it are lost
        redone = new.allreduce(pos.computing if max(marks)[:2] == (pos.epoch, pos.step) else 0)
        in_step = new.allreduce(pos.computing > 0, op=MPI.LOR)  # (else it died outside a step: lost nothing)
        # (with its last evaluation: a death after the last one leaves nothing to redo it)
        mine = (peer.state_dict(pos), peer.last) if new.Get_rank() == furthest else None
        return furthest, redone, in_step, new.bcast(mine, root=furthest)

    new, survivors, (furthest, redone, in_step, (state, last)) = ft.shrink(ctx.comm, ctx.rank, furthest_state)
    dead = [r for r in peer.members if r not in survivors]
    members, batch = peer.members, peer.batch
    peer.algo.close()
    kept = state["position"]["t"]  # (metrics rows are this far)
    if new.Get_rank() == 0:  # a checkpoint the death interrupted is redone at the same step: from scratch
        checkpoint.discard_incomplete(ctx.run_dir)  # (before Peer's first broadcast: no rank writes yet)
    ctx = _on_survivors(ctx, new, members, dead, kept)  # (faults, messages: each rank's own rank still)
    peer = Peer(ctx)
    pos = peer.load_state_dict(state)
    peer.last = last
    # (goodput) a rank that died in a step had computed its batch: one each
    peer.totals[2:] += (redone + (len(dead) * batch if in_step else 0), len(dead))
    if peer.periodic and new.Get_rank() != furthest:
        peer.algo.abandon(keep_residuals=False)  # the furthest rank's residual is its own: sent once
    peer.rest = regroup(ctx, peer, pos, len(members), Rest.from_state(state.get("rest")))
    kept_batch = f", each taking {peer.batch} samples per step to keep the global batch" \
        if ctx.cfg.keep_global_batch else ""
    if pos.epoch >= ctx.cfg.epochs:
        ctx.log.warn(f"rank(s) {dead} died at the end of the run; the {new.Get_size()} ranks left finish it "
                     f"(--on-rank-loss shrink)")
    else:
        ctx.log.warn(f"rank(s) {dead} died; going on with {new.Get_size()} ranks from epoch {pos.epoch + 1}, "
                     f"step {pos.step} of {peer.steps}, the epoch's unseen samples re-sharded over them"
                     f"{kept_batch} (--on-rank-loss shrink{', --keep-global-batch' if kept_batch else ''})")
    return ctx, peer, _loader(ctx, peer), pos, dead
