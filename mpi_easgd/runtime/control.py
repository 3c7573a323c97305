"""When to checkpoint and when to stop, decided identically on every rank.

SIGTERM and SIGUSR1 (what SLURM sends before a time limit or on preemption) only set a
flag; the training loop acts on it at the next safe point. Ranks learn of each other's
flags through one tiny Allreduce every ``check_every`` steps, so all of them checkpoint at
the same step even though the signal reached them at different moments.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import numpy as np
from mpi4py import MPI

from mpi_easgd.runtime.schedule import Schedule

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed on a signal; rerun with --resume auto


ABORT_GRACE = 0.3  # seconds for the launcher to forward this rank's last lines


def abort(comm: MPI.Comm, status: int) -> None:
    """End every rank of the job with ``status`` (``MPI_Abort``), after making sure the
    line that says why reaches the user: Hydra kills the job on abort without always
    forwarding what the aborting rank wrote just before (1 run in 20 lost it here).

    Off the main thread MPI is called only where the library allows it
    (``THREAD_MULTIPLE``); otherwise the process exits, and the launcher ends the job."""
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_GRACE)
    if threading.current_thread() is not threading.main_thread() and MPI.Query_thread() != MPI.THREAD_MULTIPLE:
        os._exit(status)
    comm.Abort(status)


class Preempted(Exception):
    """Raised after the checkpoint that a stop signal asked for has been written."""

    def __init__(self, checkpoint, lost: list[int] = ()) -> None:
        super().__init__(f"stopped by a signal; checkpoint written to {checkpoint}")
        self.checkpoint = checkpoint
        self.lost = list(lost)  # on the async tester: dropped workers, which only MPI_Abort can end


class PeerLost(RuntimeError):
    """A peer the run needs stopped answering for longer than the configured timeout, or
    died where the run cannot go on without it (one line for the user, no traceback)."""


class StopRequest:
    """Remembers that SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) arrived (the handler does nothing
    else). A second Ctrl-C ends the process at once, without a checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> StopRequest:
        """Take over the stop signals, and make SIGUSR2 write the flight record
        (:mod:`mpi_easgd.runtime.flight`)."""
        from mpi_easgd.runtime import flight

        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        flight.install_signal()
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            sys.stderr.write("mpi_easgd: interrupted twice; ending now, without a checkpoint\n")
            os._exit(130)
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


class Control:
    """Tells the training loop, in agreement across ``comm``, when to checkpoint and stop."""

    def __init__(self, comm: MPI.Comm, stop: StopRequest, every: str = "", check_every: int = 10):
        self.comm = comm
        self.stop = stop
        self.schedule = Schedule(every)
        self.check_every = check_every
        self._flags = np.zeros(2, dtype=np.int32)

    def poll(self, step: int) -> tuple[bool, bool]:
        """``(checkpoint now, stop now)`` after global step ``step`` (1-based)."""
        now = time.monotonic()
        # Counted in steps, the schedule gives the same answer on every rank; in seconds,
        # rank 0's clock decides, at the steps where the ranks compare notes anyway.
        checkpoint = bool(self.schedule.every_steps) and self.schedule.due(step, now)
        if step % self.check_every == 0:
            self._flags[0] = self.stop.requested
            self._flags[1] = self.comm.Get_rank() == 0 and self.schedule.due(step, now)
            self.comm.Allreduce(MPI.IN_PLACE, self._flags, op=MPI.MAX)
            checkpoint = checkpoint or bool(self._flags[1]) or bool(self._flags[0])
        if checkpoint:
            self.schedule.mark(step, now)
        return checkpoint, step % self.check_every == 0 and bool(self._flags[0])
