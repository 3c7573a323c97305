"""The server's center as immutable versions, and the pool of flat buffers behind them.

An exchange writes the new center over the buffer the worker's message arrived in (one
fused pass, :class:`~.easgd.ServerRule`) and the reply goes out straight from the old
version (EASGD) or the new one (DOWNPOUR), with no copy. A buffer is reused only when no
send from it is in flight, so a slow receiver never sees a changing buffer and the server
never waits for it.
"""

from __future__ import annotations

import torch
from mpi4py import MPI

from mpi_easgd.algorithms.easgd import ServerRule
from mpi_easgd.flat import flat_buffer


class BufferPool:
    """Flat buffers, recycled only when MPI is done reading them.

    A buffer is *released* when it stops being the center or a receive buffer; it returns
    to the free list once every send from it has completed.
    """

    def __init__(self, numel: int) -> None:
        self.numel = numel
        self._free: list[torch.Tensor] = []
        self._released: dict[int, torch.Tensor] = {}
        self._pending: dict[int, int] = {}
        self._sends: list[tuple[int, int, MPI.Request]] = []  # (buffer id, destination, request)

    def take(self) -> torch.Tensor:
        self._reap()
        return self._free.pop() if self._free else flat_buffer(self.numel)

    def send(self, comm: MPI.Comm, buf: torch.Tensor, dest: int, tag: int) -> MPI.Request:
        request = comm.Isend(buf.numpy(), dest=dest, tag=tag)
        self._pending[id(buf)] = self._pending.get(id(buf), 0) + 1
        self._sends.append((id(buf), dest, request))
        return request

    def abandon(self, dest: int) -> None:
        """Forget the sends to a lost rank; their buffers are never reused (MPI may still
        read them), a bounded leak of one buffer per lost worker."""
        self._sends = [s for s in self._sends if s[1] != dest]

    def release(self, buf: torch.Tensor) -> None:
        self._released[id(buf)] = buf

    def _reap(self) -> None:
        still = []
        for key, dest, request in self._sends:
            if request.Test():
                self._pending[key] -= 1
            else:
                still.append((key, dest, request))
        self._sends = still
        for key in [k for k in self._released if not self._pending.get(k)]:
            self._free.append(self._released.pop(key))

    def requests(self) -> list[MPI.Request]:
        return [r for _, _, r in self._sends]


class CenterVersions:
    """The current center (:attr:`current`, never written in place) and its buffers.

    ``home`` is the model's own flat buffer: it holds the center before the server runs and,
    after :meth:`settle`, when it has finished; it is never recycled."""

    def __init__(self, home: torch.Tensor, rule: ServerRule) -> None:
        self.home = home
        self.current = home
        self.rule = rule
        self.pool = BufferPool(home.numel())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Apply one worker's message ``x`` (a buffer from :meth:`take`, now the pool's);
        returns the buffer to reply from."""
        new, reply = self.rule.apply(self.current, x)
        if new is not self.current:
            self.retire_after_sends(self.current)  # the reply may still be read from it
        self.current = new
        return reply

    def take(self) -> torch.Tensor:
        """A buffer to receive a worker's next message into."""
        return self.pool.take()

    def retire_after_sends(self, buf: torch.Tensor | None) -> None:
        """``buf`` is no longer needed: reuse it once no send from it is in flight."""
        if buf is not None and buf is not self.home:
            self.pool.release(buf)

    def send(self, comm: MPI.Comm, buf: torch.Tensor, dest: int, tag: int) -> MPI.Request:
        return self.pool.send(comm, buf, dest, tag)

    def settle(self) -> None:
        """Make ``home`` hold the current center again."""
        if self.current is not self.home:
            self.home.copy_(self.current)
            self.current = self.home

    def load(self, values: torch.Tensor) -> None:
        self.home.copy_(values)
        self.current = self.home
