"""Entry point: ``mpirun -np N python -m mpi_easgd.train [--config FILE.toml] [flags]``.

config -> topology -> validation on every rank -> one agreement -> role dispatch. This is
the only module that names ``MPI.COMM_WORLD``. Every rank validates the configuration and
the dataset before training traffic, then all ranks agree (one allgather) so a bad input
ends every rank at once with one clear message and exit status 2. After that, an
exception on any rank aborts the whole job (``MPI_Abort``) instead of leaving the others
waiting in a collective.
"""

from __future__ import annotations

import sys

import mpi_easgd  # noqa: F401 - applies the pre-MPI-init settings
from mpi_easgd.runtime import ft, mpienv

EXIT_BAD_INPUT = 2  # (as runtime.session says)


def _validate(argv, rank: int, size: int):
    """Everything that can be checked locally; returns (cfg, topology, dataset info,
    checkpoint to resume or None, its manifest, warnings for the user)."""
    from mpi_easgd.config import ConfigError, parse_args
    from mpi_easgd.data import DataError, open_dataset, shard_range
    from mpi_easgd.data.sharding import num_batches
    from mpi_easgd.models import check_model, check_model_name
    from mpi_easgd.topology import Topology

    unresolved = parse_args(argv)
    topo = Topology.build(size, rank, unresolved.algo, unresolved.servers)
    cfg = unresolved.resolve(topo.num_workers)
    check_model_name(cfg.model)
    from mpi_easgd.tasks import task

    info = open_dataset(cfg.dataset)
    task(cfg.task).check_data(info)
    check_model(cfg.model, info, task(cfg.task))
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
    notes = cfg.advice(p, stop - start, info.shape, info.name)
    shard_range(info.sizes["test"], 0, 1 if topo.is_async else p)
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DataError("--device cuda but no CUDA device is visible; use --device cpu or auto")
    from mpi_easgd.runtime.session import check_run

    resume, manifest = check_run(cfg, topo, rank, size, unresolved)
    return cfg, topo, info, resume, manifest, notes


def run(argv: list[str] | None, comm) -> int:
    """Run one training job on ``comm``; returns the process exit status (raises what
    :func:`~mpi_easgd.runtime.session.exit_status` turns into one)."""
    from mpi4py import MPI

    from mpi_easgd.config import ConfigError
    from mpi_easgd.data import DataError
    from mpi_easgd.models import ModelError
    from mpi_easgd.runtime import session
    from mpi_easgd.runtime.checkpoint import CheckpointError
    from mpi_easgd.runtime.context import RunContext
    from mpi_easgd.runtime.control import StopRequest

    stop = StopRequest().install()  # from here on, SIGTERM/SIGUSR1 mean "checkpoint and stop"
    rank, size = comm.Get_rank(), comm.Get_size()
    error = cfg = resume = manifest = None
    try:
        cfg, topo, info, resume, manifest, notes = _validate(argv, rank, size)
    except (ConfigError, DataError, ModelError, CheckpointError, OSError) as exc:
        error = str(exc)
    try:
        run_dir, hosts = session.agree(comm, error, cfg, resume, manifest)
    except (session.BadInput, session.NothingToDo) as exc:
        return session.exit_status(comm, exc)

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
    log, started = session.open_log(cfg, topo, run_dir, resume, manifest, notes)
    if cfg.device != "cpu":
        log.info(f"devices: {placement.device} on this rank; GPU transfers "
                 f"{'straight to MPI (CUDA-aware)' if aware else 'staged through pinned host memory'} "
                 f"({why}){'; ' + placement.note if placement.note else ''}")
    if topo.role in ("peer", "worker"):
        # torch's optimizers import torch._dynamo (and sympy) on first use: 1.8 s of CPU,
        # more with several ranks per core. Pay it here, before any peer watches this rank.
        import torch._dynamo  # noqa: F401
    ctx = RunContext(cfg, comm, topo, info, device, log, run_dir, stop, resume, transfer, started, hosts=hosts)
    if topo.is_async:
        from mpi_easgd.ps.roles import run_async

        summary = run_async(ctx)
    else:
        from mpi_easgd.collectives.peer import run_peer

        ctx, summary = run_peer(ctx)  # (after --on-rank-loss shrink: the survivors' context)
    session.close_run(ctx, summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m mpi_easgd.train``: run, and turn an exception on any rank into MPI_Abort."""
    try:
        MPI = mpienv.load_mpi()
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT

    from mpi_easgd.runtime.session import exit_status

    comm = MPI.COMM_WORLD
    try:
        return run(argv, comm)
    except BaseException as exc:  # noqa: BLE001 - every way out gets its status and its one line
        return exit_status(comm, exc)

if __name__ == "__main__":
    sys.exit(ft.finalize_at_exit(main()))
