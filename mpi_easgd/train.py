"""Entry point: ``mpirun -np N python -m mpi_easgd.train [--config FILE.toml] [flags]``.

config -> topology -> validation on every rank -> one agreement -> role dispatch. This is
the only module that names ``MPI.COMM_WORLD``. Every rank validates the configuration and
the dataset before training traffic, then all ranks agree (one allgather) so a bad input
ends every rank at once with one clear message and exit status 2. After that, an
exception on any rank aborts the whole job (``MPI_Abort``) instead of leaving the others
waiting in a collective.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

import mpi_easgd  # noqa: F401 - applies the pre-MPI-init settings
from mpi_easgd.runtime import mpienv

EXIT_BAD_INPUT = 2
EXIT_WORKERS_LOST = 3  # async, --on-worker-loss continue: results saved, some workers were dropped


def _validate(argv, rank: int, size: int):
    """Everything that can be checked locally; returns (cfg, topology, dataset info,
    checkpoint to resume or None, its manifest, warnings for the user)."""
    from mpi_easgd.config import ConfigError, parse_args
    from mpi_easgd.data import DataError, read_info, resolve_dataset, shard_range
    from mpi_easgd.data.sharding import num_batches
    from mpi_easgd.models import check_model, check_model_name
    from mpi_easgd.topology import Topology

    cfg = parse_args(argv)
    topo = Topology.build(size, rank, cfg.algo)
    cfg = cfg.resolve(topo.num_workers)
    check_model_name(cfg.model)
    info = read_info(resolve_dataset(cfg.dataset))
    check_model(cfg.model, info.shape, info.num_classes)
    p = topo.num_workers
    start, stop = shard_range(info.sizes["train"], 0, p, even=not cfg.uneven)
    if stop - start < cfg.batch_size:
        raise DataError(
            f"{info.sizes['train']} training samples over {p} training ranks leave {stop - start} "
            f"per rank, fewer than --batch-size {cfg.batch_size}; lower the batch size or the ranks"
        )
    steps = num_batches(stop - start, cfg.batch_size, drop_last=True)  # per epoch, at the least
    if topo.is_async and cfg.tau > cfg.epochs * steps:
        raise ConfigError(f"--tau {cfg.tau} is more than the {cfg.epochs * steps} steps each worker takes in "
                          f"this run ({cfg.epochs} epochs x {steps}): workers would exchange with the server "
                          f"only at the start and the end; lower --tau or raise --epochs")
    if cfg.on_worker_loss == "continue" and p < 2:
        raise ConfigError(f"--on-worker-loss continue needs at least 2 workers, this run has {p}: without "
                          f"its only worker a run cannot go on; use --on-worker-loss abort, or more ranks")
    from mpi_easgd.runtime import ft

    for option, needs in (("--on-worker-loss respawn", cfg.on_worker_loss == "respawn"),
                          ("--on-rank-loss shrink", cfg.on_rank_loss == "shrink")):
        refused = ft.refusal(option) if needs else None
        if refused:
            raise ConfigError(refused)
    notes = cfg.advice(p, stop - start, info.shape, info.name)
    if topo.is_async:
        from mpi_easgd.runtime.watchdog import require_thread_multiple

        try:
            require_thread_multiple(f"async {cfg.algo}")
        except RuntimeError as exc:
            raise ConfigError(str(exc)) from None
    shard_range(info.sizes["test"], 0, 1 if topo.is_async else p)
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DataError("--device cuda but no CUDA device is visible; use --device cpu or auto")
    resume, manifest = None, {}
    if cfg.resume:
        import dataclasses

        from mpi_easgd.runtime import checkpoint

        resume = checkpoint.locate(cfg.resume, cfg.out, cfg.run_name)
        if resume is not None:
            manifest = checkpoint.read_manifest(resume)
            checkpoint.check_fits(manifest, dataclasses.asdict(cfg), size, resume)
            rejoins = str(rank) in manifest.get("rejoin", {})  # lost in that run: restarts from the center
            if not rejoins and not checkpoint.rank_file(resume, rank).is_file():
                raise checkpoint.CheckpointError(f"{checkpoint.rank_file(resume, rank)} is missing; "
                                                 f"use an earlier checkpoint")
            if checkpoint.finished(manifest, cfg.epochs) and not rejoins:
                checkpoint.load_rank(resume, rank)  # a damaged file is reported, even with nothing to do
    return cfg, topo, info, resume, manifest, notes


def _make_run_dir(cfg) -> Path:
    name = cfg.run_name or f"{cfg.algo}-{cfg.model}-{datetime.now():%Y%m%d-%H%M%S}"
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


def run(argv: list[str] | None, comm) -> int:
    """Run one training job on ``comm``; returns the process exit status."""
    from mpi4py import MPI

    from mpi_easgd.config import ConfigError
    from mpi_easgd.data import DataError
    from mpi_easgd.models import ModelError
    from mpi_easgd.runtime.checkpoint import CheckpointError, checkpoint_step, finished
    from mpi_easgd.runtime.context import RunContext
    from mpi_easgd.runtime.control import StopRequest
    from mpi_easgd.runtime.metrics import NullRunLog, RunLog

    stop = StopRequest().install()  # from here on, SIGTERM/SIGUSR1 mean "checkpoint and stop"
    rank, size = comm.Get_rank(), comm.Get_size()
    error, run_dir, done = None, None, False
    try:
        cfg, topo, info, resume, manifest, notes = _validate(argv, rank, size)
        done = resume is not None and finished(manifest, cfg.epochs)
        if rank == 0 and not done:
            run_dir = resume.parent.parent if resume else _make_run_dir(cfg)
    except (ConfigError, DataError, ModelError, CheckpointError, OSError) as exc:
        error = str(exc)
    # The one agreement: every rank reaches it, so nobody waits on a rank that gave up.
    reports = comm.allgather((error, run_dir))
    failed = [(r, e) for r, (e, _) in enumerate(reports) if e]
    if failed:
        if rank == 0:
            where = "" if len(failed) == size else f" (on rank {', '.join(str(r) for r, _ in failed)})"
            print(f"mpi_easgd: error: {failed[0][1]}{where}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if done:  # a requeue or resubmission of a finished run: leave it exactly as it is
        if rank == 0:
            print(f"mpi_easgd: {resume.parent.parent} already finished its {manifest['config']['epochs']} epochs; "
                  f"nothing to do (pass a larger --epochs to train on, or another --run-name for a new run)",
                  flush=True)
        return 0
    if rank == 0:
        for note in notes:  # the same on every rank: said once
            print(f"mpi_easgd: warning: {note}", file=sys.stderr, flush=True)
    run_dir = reports[0][1]

    import torch

    from mpi_easgd.transfer import cuda_aware, place

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this node
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    torch.set_num_threads(cfg.threads or max(1, mpienv.local_cores() // local_size))
    gpus = torch.cuda.device_count() if cfg.device != "cpu" else 0
    placement = place(cfg.device, topo.role, local_rank, local_size, gpus)
    device = torch.device(placement.device)
    aware, why = cuda_aware(cfg.cuda_aware)
    transfer = "direct" if device.type == "cpu" or aware else "staged"
    # The run's clock goes on from the checkpoint's, like its training time and samples.
    started = time.perf_counter() - manifest.get("wall_seconds", 0.0)
    log = (RunLog(run_dir, vars(cfg), cfg.progress, cfg.tensorboard, started=started,
                  resumed_at=checkpoint_step(resume) if resume else None, warnings=notes)
           if topo.logs else NullRunLog())
    for note in mpienv.NOTES:
        log.info(note)
    if cfg.device != "cpu":
        log.info(f"devices: {placement.device} on this rank; GPU transfers "
                 f"{'straight to MPI (CUDA-aware)' if aware else 'staged through pinned host memory'} "
                 f"({why}){'; ' + placement.note if placement.note else ''}")
    if topo.role in ("peer", "worker"):
        # torch's optimizers import torch._dynamo (and sympy) on first use: 1.8 s of CPU,
        # more with several ranks per core. Pay it here, before any peer watches this rank.
        import torch._dynamo  # noqa: F401
    ctx = RunContext(cfg, comm, topo, info, device, log, run_dir, stop, resume, transfer, started)
    if topo.is_async:
        from mpi_easgd.ps.roles import run_async

        summary = run_async(ctx)
    else:
        from mpi_easgd.collectives.peer import run_peer

        summary = run_peer(ctx)
    if topo.logs:
        summary["wall_seconds"] = time.perf_counter() - started
        summary["device"] = str(device)
        summary["transfer"] = f"{transfer} ({why})" if device.type != "cpu" else "direct (CPU)"
        summary["run_dir"] = str(run_dir)
        log.write_summary(summary)
        hung = [r for r in summary.get("lost_workers", []) if r not in summary.get("dead_workers", [])]
        if hung:
            _end_without(comm, EXIT_WORKERS_LOST, f"finished without worker rank(s) {hung}, which were dropped")
    return 0


def _end_without(comm, status: int, what: str) -> None:
    """End a job whose dropped workers are still hanging: MPI cannot let them go another way."""
    from mpi_easgd.runtime.control import abort

    print(f"mpi_easgd: {what}; everything is saved in the run directory, ending the job (exit {status})",
          file=sys.stderr, flush=True)
    abort(comm, status)


def main(argv: list[str] | None = None) -> int:
    """``python -m mpi_easgd.train``: run, and turn an exception on any rank into MPI_Abort."""
    try:
        MPI = mpienv.load_mpi()
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT

    from mpi_easgd.runtime.checkpoint import CheckpointError, CheckpointFailed
    from mpi_easgd.runtime.control import EXIT_PREEMPTED, PeerLost, Preempted, abort
    from mpi_easgd.runtime.loop import NonFiniteError

    comm = MPI.COMM_WORLD
    try:
        return run(argv, comm)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:  # Ctrl-C before the stop handler was installed (while starting)
        print("mpi_easgd: interrupted while starting; nothing was trained", file=sys.stderr)
        return 130
    except Preempted as exc:  # raised on every rank at the same step, after the checkpoint
        if comm.Get_rank() == 0:
            print(f"mpi_easgd: {exc}; continue with --resume auto (exit {EXIT_PREEMPTED})", file=sys.stderr)
        if exc.lost:
            _end_without(comm, EXIT_PREEMPTED, f"stopped; worker rank(s) {exc.lost} were dropped "
                                               f"and rejoin from the center on resume")
        return EXIT_PREEMPTED
    except CheckpointFailed:  # the rank that failed has said why
        pass
    except (NonFiniteError, CheckpointError, PeerLost) as exc:  # expected failures: one line, no traceback
        print(f"mpi_easgd: error: {exc}", file=sys.stderr)
    except BaseException as exc:
        from mpi_easgd.runtime import ft

        if ft.is_failure(exc):  # a peer this rank needed died (ULFM): the run cannot go on
            dead = sorted(ft.failed_ranks(comm))
            print(f"mpi_easgd: error: rank {comm.Get_rank()} lost rank(s) {dead} (their process died) and "
                  f"cannot go on without them; ending the job (the newest checkpoint is intact: continue "
                  f"with --resume auto)", file=sys.stderr)
        else:
            sys.stderr.write(traceback.format_exc())  # one write: MPI_Abort may cut a piecemeal one short
    if comm.Get_size() > 1:
        abort(comm, 1)  # end every rank now instead of leaving them in a collective
    return 1


if __name__ == "__main__":
    sys.exit(main())
