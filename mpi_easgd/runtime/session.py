"""Opening and closing one run, the same for the command line and a user's script.

- :func:`check_run`: the checks every run makes on every rank before any traffic (worker
  loss needs workers, ULFM when asked for, thread support for the async roles, the
  checkpoint to resume);
- :func:`agree`: the one agreement: every rank reports what it found, so a bad input ends
  every rank at once with one line and exit status 2 (:class:`BadInput`), and a finished
  run is left exactly as it is (:class:`NothingToDo`); rank 0 makes the run directory;
- :func:`open_log`: the run directory's owner gets a :class:`~.metrics.RunLog`, every
  other rank a null one;
- :func:`close_run`: the summary, and the end of a job whose dropped workers still hang;
- :func:`exit_status`: what an exception means for the process (one line, ``MPI_Abort``
  of the others, exit 75 after a stop signal's checkpoint).

Imports are lazy: ``import mpi_easgd`` must stay free of torch (a spare worker starts MPI
at once).
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_WORKERS_LOST = 3  # async, --on-worker-loss continue: results saved, some workers were dropped


class BadInput(Exception):
    """A configuration, dataset or checkpoint that cannot be used: one line, exit status 2."""


class NothingToDo(Exception):
    """The checkpoint to resume is a finished run: it is left exactly as it is."""


def check_run(cfg, topo, rank: int, size: int, unresolved=None) -> tuple[Path | None, dict]:
    """The checks that need no data and no traffic; returns the checkpoint to resume (or
    None) and its manifest. Raises ``ConfigError`` or ``CheckpointError``.
    ``unresolved``: the run's configuration before :meth:`~mpi_easgd.config.Config.resolve`
    (with it, a checkpoint may resume at another size)."""
    from mpi_easgd.config import ConfigError

    p = topo.num_workers
    if cfg.on_worker_loss == "continue" and p < 2:
        raise ConfigError(f"--on-worker-loss continue needs at least 2 workers, this run has {p}: without "
                          f"its only worker a run cannot go on; use --on-worker-loss abort, or more ranks")
    from mpi_easgd.runtime import ft

    for option, needs in (("--on-worker-loss respawn", cfg.on_worker_loss == "respawn"),
                          ("--on-rank-loss shrink", cfg.on_rank_loss == "shrink")):
        refused = ft.refusal(option) if needs else None
        if refused:
            raise ConfigError(refused)
    if topo.is_async:
        from mpi_easgd.runtime.watchdog import require_thread_multiple

        try:
            require_thread_multiple(f"async {cfg.algo}")
        except RuntimeError as exc:
            raise ConfigError(str(exc)) from None
    resume, manifest = None, {}
    if cfg.resume:
        import dataclasses

        from mpi_easgd.runtime import checkpoint
        from mpi_easgd.topology import Topology

        resume = checkpoint.locate(cfg.resume, cfg.out, cfg.run_name)
        if resume is not None:
            manifest = checkpoint.read_manifest(resume)
            saved_size = manifest["world_size"]
            at_saved_size = None
            if unresolved is not None and saved_size != size:
                refused = resize_refusal(manifest, cfg, topo)
                if refused:
                    raise checkpoint.CheckpointError(f"checkpoint {resume} was written by {saved_size} ranks, this "
                                                     f"run has {size}; {refused}")
                # (defaults that follow the number of workers follow it; another algorithm is refused below)
                try:
                    old = Topology.build(saved_size, 0, cfg.algo, cfg.servers).num_workers
                except ConfigError:
                    old = saved_size
                at_saved_size = dataclasses.asdict(unresolved.resolve(old))
            checkpoint.check_fits(manifest, dataclasses.asdict(cfg), size, resume, at_saved_size)
            # lost in that run: restarts from the center; a group's member (--groups): from its leader; at
            # another size, an async worker starts from the center too
            source = topo.saved_by(saved_size)
            rejoins = str(rank) in manifest.get("rejoin", {}) or rank in manifest.get("group_members", []) \
                or source is None
            if not rejoins and not checkpoint.rank_file(resume, source).is_file():
                raise checkpoint.CheckpointError(f"{checkpoint.rank_file(resume, source)} is missing; "
                                                 f"use an earlier checkpoint")
            if checkpoint.finished(manifest, cfg.epochs) and not rejoins:
                checkpoint.load_rank(resume, source)  # a damaged file is reported, even with nothing to do
    return resume, manifest


def resize_refusal(manifest: dict, cfg, topo) -> str | None:
    """Why a checkpoint cannot resume at this run's size (None: it can): an asynchronous
    run's server ranks and groups must stay as they were."""
    if not topo.is_async:
        return None
    saved = manifest["config"]
    if saved.get("servers", 1) != cfg.servers:
        return (f"its center is split over --servers {saved.get('servers', 1)}: resume with --servers "
                f"{saved.get('servers', 1)} (the number of workers may change)")
    if saved.get("groups", "1") != "1" or cfg.groups != "1":
        return (f"a run with --groups resumes on as many ranks (mpirun -np {manifest['world_size']}); without "
                f"groups the number of workers may change")
    return None


def make_run_dir(cfg) -> Path:
    """``--out/--run-name`` (default ``ALGO-MODEL-YYYYmmdd-HHMMSS``), created."""
    algo = cfg.algo.rpartition(":")[2] or cfg.algo  # a user's rule: its class name
    name = cfg.run_name or f"{algo}-{cfg.model}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(cfg.out) / name
    try:
        run_dir.mkdir(parents=True, exist_ok=bool(cfg.run_name))
    except FileExistsError:
        run_dir = Path(cfg.out) / f"{name}-{os.getpid()}"
        run_dir.mkdir(parents=True)
    except OSError as exc:
        raise OSError(f"cannot create the run directory {run_dir} ({exc.strerror}); choose a "
                      f"writable --out") from None
    return run_dir.resolve()


def agree(comm, error: str | None, cfg=None, resume: Path | None = None,
          manifest: dict | None = None) -> tuple[Path, tuple[str, ...]]:
    """The one agreement (every rank reaches it, so nobody waits on a rank that gave up):
    ``error`` is what this rank found wrong (None: nothing). Returns the run directory
    (rank 0 makes it) and every rank's host name. Raises :class:`BadInput` on every rank if any rank failed (rank 0
    says which, in one line), :class:`NothingToDo` if ``resume`` is a finished run."""
    from mpi_easgd.runtime.checkpoint import finished

    rank, size = comm.Get_rank(), comm.Get_size()
    done = error is None and resume is not None and finished(manifest, cfg.epochs)
    run_dir = None
    if error is None and rank == 0 and not done:
        try:
            run_dir = resume.parent.parent if resume else make_run_dir(cfg)
        except OSError as exc:
            error = str(exc)
    reports = comm.allgather((error, run_dir, socket.gethostname()))
    failed = [(r, e) for r, (e, _, _) in enumerate(reports) if e]
    if failed:
        if rank == 0:
            where = "" if len(failed) == size else f" (on rank {', '.join(str(r) for r, _ in failed)})"
            print(f"mpi_easgd: error: {failed[0][1]}{where}", file=sys.stderr, flush=True)
        raise BadInput(failed[0][1])
    if done:  # a requeue or resubmission of a finished run: leave it exactly as it is
        if rank == 0:
            print(f"mpi_easgd: {resume.parent.parent} already finished its {manifest['config']['epochs']} epochs; "
                  f"nothing to do (pass a larger --epochs to train on, or another --run-name for a new run)",
                  flush=True)
        raise NothingToDo(str(resume))
    return reports[0][1], tuple(host for _, _, host in reports)


def open_log(cfg, topo, run_dir: Path, resume: Path | None, manifest: dict, notes: list[str]):
    """``(log, started)``: the run log (the owner's :class:`RunLog`, elsewhere a null one;
    warnings said once) and the ``time.perf_counter()`` origin of the run's clock, which
    goes on from the checkpoint's."""
    from mpi_easgd.runtime import flight, mpienv
    from mpi_easgd.runtime.checkpoint import checkpoint_step
    from mpi_easgd.runtime.metrics import NullRunLog, RunLog

    flight.RECORDER.folder = Path(run_dir) / "flight"  # where a hang's records go
    if topo.rank == 0:
        for note in notes:  # the same on every rank: said once
            print(f"mpi_easgd: warning: {note}", file=sys.stderr, flush=True)
    started = time.perf_counter() - manifest.get("wall_seconds", 0.0)
    log = (RunLog(run_dir, vars(cfg), cfg.progress, cfg.tensorboard, started=started,
                  resumed_at=checkpoint_step(resume) if resume else None, warnings=notes)
           if topo.logs else NullRunLog())
    for note in mpienv.NOTES:
        log.info(note)
    return log, started


def transfer_description(ctx) -> str:
    """How tensors reached MPI, for the summary: ``direct (CPU)``, or a GPU run's transfer
    path and why it was chosen."""
    if ctx.device.type == "cpu":
        return "direct (CPU)"
    from mpi_easgd.transfer import cuda_aware

    return f"{ctx.transfer} ({cuda_aware(ctx.cfg.cuda_aware)[1]})"


def close_run(ctx, summary: dict | None) -> None:
    """On the rank that logs: complete and write the summary; end a job whose dropped
    workers still hang (MPI cannot let them go another way; exit 3)."""
    if ctx.topo.logs and summary is not None:
        write_summary(ctx, ctx.log, summary)


def write_summary(ctx, log, summary: dict) -> None:
    """Complete ``summary`` (wall time, device, transfer, run directory, environment) and
    write it with ``log``; end a job whose dropped workers still hang (exit 3)."""
    summary["wall_seconds"] = time.perf_counter() - ctx.started
    summary["device"] = str(ctx.device)
    summary["transfer"] = transfer_description(ctx)
    summary["run_dir"] = str(ctx.run_dir)
    from mpi_easgd.runtime.environment import describe

    summary["environment"] = describe(list(ctx.hosts))
    log.write_summary(summary)
    hung = [r for r in summary.get("lost_workers", []) if r not in summary.get("dead_workers", [])]
    if hung:
        end_without(ctx.comm, EXIT_WORKERS_LOST, f"finished without worker rank(s) {hung}, which were dropped")


def end_without(comm, status: int, what: str) -> None:
    """End a job whose dropped workers are still hanging: MPI cannot let them go another way."""
    from mpi_easgd.runtime.control import abort

    print(f"mpi_easgd: {what}; everything is saved in the run directory, ending the job (exit {status})",
          file=sys.stderr, flush=True)
    abort(comm, status)


def leave(status: int) -> None:
    """End this process now with ``status``, quietly, when every rank of the run ends the
    same way (a bad input, a stop signal's checkpoint): MPI is finalized first, so that the
    launcher takes the status from every rank instead of killing those still finalizing
    (MPICH's mpiexec then said 9, not 75). Not ``SystemExit``: ``python -m mpi4py`` would
    turn it into ``MPI_Abort`` and a line of its own on every rank."""
    sys.stdout.flush()
    sys.stderr.flush()
    from mpi_easgd.runtime import ft

    ft.finalize(status)
    os._exit(status)


def exit_status(comm, exc: BaseException, resume_hint: str = "--resume auto") -> int:
    """What ``exc``, raised out of a run on this rank, means for the process: the status
    to exit with, after saying why in one line (a traceback only for the unexpected).
    Every other rank is ended with ``MPI_Abort`` where the run cannot go on."""
    from mpi_easgd.data import DataError
    from mpi_easgd.runtime.checkpoint import CheckpointError, CheckpointFailed
    from mpi_easgd.runtime.control import EXIT_PREEMPTED, PeerLost, Preempted, abort
    from mpi_easgd.runtime.loop import NonFiniteError

    if isinstance(exc, BadInput):
        return EXIT_BAD_INPUT  # said by rank 0
    if isinstance(exc, NothingToDo):
        return 0
    if isinstance(exc, SystemExit):  # --help
        return exc.code if isinstance(exc.code, int) else 0
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C before the stop handler was installed (while starting)
        print("mpi_easgd: interrupted while starting; nothing was trained", file=sys.stderr)
        return 130
    if isinstance(exc, Preempted):  # raised on every rank at the same step, after the checkpoint
        if comm.Get_rank() == 0:
            print(f"mpi_easgd: {exc}; continue with {resume_hint} (exit {EXIT_PREEMPTED})", file=sys.stderr)
        if exc.lost:
            end_without(comm, EXIT_PREEMPTED, f"stopped; worker rank(s) {exc.lost} were dropped "
                                              f"and rejoin from the center on resume")
        return EXIT_PREEMPTED
    if isinstance(exc, CheckpointFailed):  # the rank that failed has said why
        pass
    elif isinstance(exc, (NonFiniteError, CheckpointError, PeerLost, DataError)):  # expected: one line, no traceback
        print(f"mpi_easgd: error: {exc}", file=sys.stderr)
    else:
        from mpi_easgd.runtime import ft

        if ft.is_failure(exc):  # a peer this rank needed died (ULFM): the run cannot go on
            dead = sorted(ft.failed_ranks(comm))
            print(f"mpi_easgd: error: rank {comm.Get_rank()} lost rank(s) {dead} (their process died) and "
                  f"cannot go on without them; ending the job (the newest checkpoint is intact: continue "
                  f"with {resume_hint})", file=sys.stderr)
        else:
            sys.stderr.write("".join(traceback.format_exception(exc)))  # one write: MPI_Abort may cut it short
    if comm.Get_size() > 1:
        abort(comm, 1)  # end every rank now instead of leaving them in a collective
    return 1
