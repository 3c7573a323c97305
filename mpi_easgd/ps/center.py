"""The server's center as immutable versions, and the pool of flat buffers behind them.

An exchange writes the new center over the buffer the worker's message arrived in (one
fused pass, :class:`~mpi_easgd.rules.asynchronous.ServerRule`) and the reply goes out straight from the old
version (EASGD) or the new one (DOWNPOUR), with no copy. A buffer is reused only when no
send from it is in flight, so a slow receiver never sees a changing buffer and the server
never waits for it.

With a narrower exchange dtype (``--exchange-dtype float16|bfloat16``) messages arrive in,
and replies leave from, buffers of that type (a pool of their own); the center and every
update stay float32: an arriving message is cast up before the rule applies it, a reply is
cast down into a fresh wire buffer. A compressed format (``int8|int4|topk``) arrives in and
leaves from byte buffers: a message is decoded, a reply encoded, each through the worker's
:class:`~.wire.ServerChannel`.
"""

from __future__ import annotations

import torch
from mpi4py import MPI

from mpi_easgd.compress import Codec
from mpi_easgd.flat import flat_buffer
from mpi_easgd.ps.wire import ServerChannel
from mpi_easgd.rules.asynchronous import Arrival, ServerRule
from mpi_easgd.runtime import ft
from mpi_easgd.transfer import mpi_view


class BufferPool:
    """Flat buffers, recycled only when MPI is done reading them.

    A buffer is *released* when it stops being the center or a receive buffer; it returns
    to the free list once every send from it has completed.
    """

    def __init__(self, numel: int, dtype: torch.dtype = torch.float32) -> None:
        self.numel, self.dtype = numel, dtype
        self._free: list[torch.Tensor] = []
        self._released: dict[int, torch.Tensor] = {}
        self._pending: dict[int, int] = {}
        self._sends: list[tuple[int, tuple, MPI.Request]] = []  # (buffer id, (comm, rank), request)

    def take(self) -> torch.Tensor:
        self._reap()
        if self._free:
            return self._free.pop()
        return flat_buffer(self.numel) if self.dtype == torch.float32 else torch.empty(self.numel, dtype=self.dtype)

    def send(self, comm: MPI.Comm, buf: torch.Tensor, dest: int, tag: int) -> MPI.Request:
        request = comm.Isend(mpi_view(buf), dest=dest, tag=tag)
        self._pending[id(buf)] = self._pending.get(id(buf), 0) + 1
        self._sends.append((id(buf), (comm.py2f(), dest), request))
        return request

    def abandon(self, comm: MPI.Comm, dest: int) -> None:
        """Forget the sends to a lost rank of ``comm``; their buffers are never reused (MPI
        may still read them), a bounded leak of one buffer per lost worker."""
        self._sends = [s for s in self._sends if s[1] != (comm.py2f(), dest)]

    def release(self, buf: torch.Tensor) -> None:
        self._released[id(buf)] = buf

    def _reap(self) -> None:
        still = []
        for key, dest, request in self._sends:
            if ft.test(request):  # (a send to a rank that died is over too)
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
    after :meth:`settle`, when it has finished; it is never recycled. ``wire``: the dtype
    of the workers' messages and of the replies (module docstring)."""

    def __init__(self, home: torch.Tensor, rule: ServerRule, wire: torch.dtype | Codec = torch.float32) -> None:
        self.home = home
        self.current = home
        self.rule = rule
        self.codec = wire if isinstance(wire, Codec) else None
        self.pool = BufferPool(home.numel())
        if self.codec is not None:
            self.wire_pool = BufferPool(self.codec.nbytes(home.numel()), torch.uint8)
        else:
            self.wire_pool = self.pool if wire == torch.float32 else BufferPool(home.numel(), wire)
        self._pools = [self.pool] + ([self.wire_pool] if self.wire_pool is not self.pool else [])

    def arrived(self, buf: torch.Tensor, channel: ServerChannel | None = None) -> torch.Tensor:
        """A worker's message as the rule takes it (float32, the pool's): ``buf`` (from
        :meth:`take`) cast up or decoded through its worker's ``channel``."""
        if self.wire_pool is self.pool:
            return buf
        x = self.pool.take()
        if self.codec is None:
            x.copy_(buf)  # cast up
        elif channel.up is not None:
            x.copy_(channel.up.decode(buf))  # a state, against the reference both ends hold
        else:
            self.codec.decode(buf, x)  # an increment
        self.wire_pool.release(buf)  # no send from it: free again
        return x

    def apply(self, x: torch.Tensor, arrival: Arrival | None = None,
              channel: ServerChannel | None = None) -> torch.Tensor:
        """Apply one worker's message ``x`` (from :meth:`arrived`); returns the buffer to
        reply from (in the wire format, encoded through ``channel`` if compressed). A
        wire-format reply buffer is already released: it must be sent (:meth:`send`) before
        the next :meth:`take`."""
        new, reply = self.rule.exchange(self.current, x, arrival)
        if new is not self.current:
            self.retire_after_sends(self.current)  # the reply may still be read from it
        self.current = new
        if self.wire_pool is not self.pool:
            out = self.wire_pool.take()  # reused once sent
            if self.codec is None:
                out.copy_(reply)  # cast down
            else:
                channel.down.encode(reply, out)
            self.wire_pool.release(out)
            reply = out
        return reply

    def take(self) -> torch.Tensor:
        """A buffer to receive a worker's next message into."""
        return self.wire_pool.take()

    def retire_after_sends(self, buf: torch.Tensor | None) -> None:
        """``buf`` is no longer needed: reuse it once no send from it is in flight."""
        if buf is not None and buf is not self.home:
            (self.pool if buf.dtype == torch.float32 else self.wire_pool).release(buf)

    def send(self, comm: MPI.Comm, buf: torch.Tensor, dest: int, tag: int) -> MPI.Request:
        return (self.pool if buf.dtype == torch.float32 else self.wire_pool).send(comm, buf, dest, tag)

    def abandon(self, comm: MPI.Comm, dest: int) -> None:
        """Forget the sends to a lost rank (:meth:`BufferPool.abandon`)."""
        for pool in self._pools:
            pool.abandon(comm, dest)

    def requests(self) -> list[MPI.Request]:
        """Every send still in flight."""
        return [request for pool in self._pools for request in pool.requests()]

    def settle(self) -> None:
        """Make ``home`` hold the current center again."""
        if self.current is not self.home:
            self.home.copy_(self.current)
            self.current = self.home

    def load(self, values: torch.Tensor) -> None:
        self.home.copy_(values)
        self.current = self.home
