"""Late joiners: worker processes started on their own after an async run began
(``python -m mpi_easgd.join RUN_DIR``, or a script's :meth:`AsyncTraining.join
<mpi_easgd.ps.api.AsyncTraining.join>`; the run has ``--accept-joiners``).

Rank 0 listens on a TCP port and writes where, with the run's set-up, to
``RUN_DIR/join.json`` (:class:`Doorway`). A joiner prepares everything it can first
(torch, the model, the dataset: :func:`mpi_easgd.ps.join.prepare`), then connects; a
thread on rank 0 takes the connection (a plain socket: no MPI call off the main thread)
and wakes the server's loop with the liveness thread's wake-up call. The server then makes
the connection an intercommunicator (``MPI_Comm_join``, which the joiner is already in:
``MPI_Comm_accept`` in a thread held MPICH's lock and stalled the server), adds a record
for it (a rank past the run's ranks), sends it its place and the current center, and from
then on serves it as any worker: over the intercommunicator, as a replacement worker is
(:mod:`mpi_easgd.ps.spares`). Never during a checkpoint: the joiner waits for its end.

The joiner's side is :func:`read_door` (wait for the door; the set-up it says) and
:func:`knock` (connect, and learn its place). A joiner trains from the epoch the run has
reached to ``--epochs`` (the command line's: each epoch a random share of the training
set as large as one worker's shard; a script's: the data it gives); it counts in the summary
(``joined``, and the seconds from its connection to its first exchange). MPICH joins two
separately started jobs; Open MPI only inside one DVM (``prte`` and ``prun``).
"""

from __future__ import annotations

import json
import os
import queue
import socket
import threading
import time
from pathlib import Path

from mpi4py import MPI

DOOR = "join.json"


class Doorway:
    """Rank 0's open door (module docstring): ``wake()`` wakes the server's loop after each
    connection, which :meth:`arrivals` then turns into intercommunicators."""

    def __init__(self, run_dir: Path, setup: dict, wake, samples_per_epoch: int) -> None:
        self.path = Path(run_dir) / DOOR
        self.samples_per_epoch = samples_per_epoch  # (the epoch a joiner starts in: the run's)
        self.wake, self._arrived = wake, queue.Queue()
        self._listener = socket.create_server(("", 0))
        self._listener.settimeout(0.2)  # (closing a socket does not end another thread's accept: it looks)
        self._closing = threading.Event()
        record = dict(host=socket.gethostname(), port=self._listener.getsockname()[1], setup=setup, pid=os.getpid())
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self.path)
        self._thread = threading.Thread(target=self._accept, name="mpi_easgd-doorway", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            connection.settimeout(None)
            self._arrived.put((connection, time.time()))
            self.wake()

    def arrivals(self) -> list[tuple[MPI.Intercomm, MPI.Intercomm, float]]:
        """The joiners that connected since the last call: (communicator, liveness, when)."""
        found = []
        while not self._arrived.empty():
            connection, when = self._arrived.get()
            with connection:
                inter = MPI.Comm.Join(connection.fileno())
            found.append((inter, inter.Dup(), when))  # (the joiner's liveness channel, as every worker has)
        return found

    def close(self) -> None:
        """No more joiners: the file goes, the waiting thread ends, a late one is told."""
        self.path.unlink(missing_ok=True)
        self._closing.set()
        self._thread.join()
        self._listener.close()
        for inter, live, _ in self.arrivals():  # (connected too late)
            refuse(inter, live)


class JoinRefused(ValueError):
    """The run cannot be joined; the message says why and what to do."""


def read_door(run_dir: Path, wait: float = 60.0) -> dict:
    """The door of ``run_dir``, waiting up to ``wait`` seconds for the run to open it (it
    does once its server starts): where to connect and the run's set-up. Raises
    :class:`JoinRefused`."""
    run_dir = Path(run_dir)
    deadline = time.monotonic() + wait
    while not (run_dir / DOOR).exists() and not (run_dir / "summary.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    if not run_dir.is_dir():
        raise JoinRefused(f"{run_dir} is not a run directory; pass the RUN_DIR the run printed")
    if not (run_dir / DOOR).is_file():
        raise JoinRefused(f"{run_dir} takes no joiners: start the async run with --accept-joiners (a joiner joins "
                          f"while the run trains, not after it ended)")
    door = json.loads((run_dir / DOOR).read_text())
    if door["host"] == socket.gethostname():
        try:
            os.kill(door["pid"], 0)
        except ProcessLookupError:
            raise JoinRefused(f"{run_dir}'s rank 0 (pid {door['pid']}) is gone: the run ended without closing its "
                              f"door") from None
        except PermissionError:
            pass
    return door


def knock(door: dict) -> tuple[MPI.Intercomm, MPI.Intercomm, dict] | None:
    """Connect through ``door`` (:func:`read_door`): the run's (messages, liveness)
    intercommunicators, on which rank 0 is the server, and this joiner's place (its
    ``rank``, the ``epoch`` the run has reached, its number ``joiner``); None when the run
    is ending and needs no one (the connection is let go). The server sends the center
    next (tag START)."""
    from mpi_easgd.ps.protocol import Tag, receive_object

    with socket.create_connection((door["host"], door["port"])) as connection:
        inter = MPI.Comm.Join(connection.fileno())
    live = inter.Dup()  # (every worker's liveness channel)
    place = receive_object(inter, 0, Tag.JOIN)[1]
    if place is None:
        live.Disconnect()
        inter.Disconnect()
    return None if place is None else (inter, live, place)


def refuse(inter: MPI.Intercomm, live: MPI.Intercomm) -> None:
    """Tell a joiner it is not needed (the run is ending) and let it go."""
    from mpi_easgd.ps.protocol import Tag

    inter.send(None, dest=0, tag=Tag.JOIN)
    live.Disconnect()
    inter.Disconnect()
