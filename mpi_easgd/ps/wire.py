"""The exchange's two directions in the run's format, at the worker and at the server.

A floating format (``--exchange-dtype float32|float16|bfloat16``) is a cast: the worker's
:class:`~mpi_easgd.transfer.MPIBuffer` does it on its side, the server's buffer pool on its
own (:mod:`.center`). A compressed one (``int8|int4|topk``, :mod:`mpi_easgd.compress`)
keeps state at both ends of each direction, with error feedback in both:

- worker to server: a message that is a state (EASGD's parameters, ``message = "state"``
  on the worker rule) travels against a reference both ends hold; one that is an increment
  (DOWNPOUR's update, a pseudo-gradient: ``"delta"``) carries the worker's residual;
- server to worker: the reply (the center) travels against a reference both ends hold.

So the server keeps, per worker, one float32 copy of the model for the reply's reference
and, for state messages, one more for the message's: 4 or 8 bytes per parameter and worker
(an 11 M-parameter model: 44 or 88 MB per worker). Both ends' references start from the
center the worker started from (the broadcast at the start of a run or segment, the
center a replacement is sent), so they need no checkpoint; the worker's residual is in its
checkpoint file.
"""

from __future__ import annotations

import torch

from mpi_easgd.compress import Codec, DeltaSender, StateReceiver, StateSender, message_buffer
from mpi_easgd.rules.asynchronous import WorkerRule, message_kind
from mpi_easgd.transfer import MPIBuffer


class WorkerWire:
    """A worker's end of the exchange in format ``wire`` (a floating dtype or a codec:
    :func:`mpi_easgd.compress.wire_format`). :attr:`buffers` are the MPI buffers of its
    message and of the reply, one pair per server shard (``bounds``: each shard's
    ``[start, stop)`` in the flat parameters; default: one, the whole). :meth:`before_send`
    fills the messages from ``rule.send`` and returns what the servers will apply, shard by
    shard; :meth:`after_recv` writes the replies into ``rule.reply``.
    ``start``: the center this worker starts from."""

    def __init__(self, rule: WorkerRule, wire: torch.dtype | Codec, transfer: str, start: torch.Tensor,
                 bounds: list[tuple[int, int]] | None = None) -> None:
        self.rule = rule
        self.codec = wire if isinstance(wire, Codec) else None
        state = message_kind(type(rule)) == "state"
        bounds = bounds or [(0, rule.send.numel())]
        self.parts = [_Part(rule.send[a:b], rule.reply[a:b], state, wire, transfer, start[a:b]) for a, b in bounds]

    @property
    def buffers(self) -> list[tuple[object, object]]:
        """(message, reply) as MPI takes them, one pair per server shard."""
        return [(part.send.mpi, part.reply.mpi) for part in self.parts]

    @property
    def bytes_each_way(self) -> tuple[int, int]:
        """(bytes of a message, bytes of a reply), every shard's together."""
        return tuple(sum(part.bytes_each_way[i] for part in self.parts) for i in (0, 1))

    def before_send(self) -> list[torch.Tensor]:
        """Fill the messages; returns what each server will apply (one tensor per shard)."""
        return [part.before_send() for part in self.parts]

    def after_recv(self) -> None:
        for part in self.parts:
            part.after_recv()

    def state_dict(self) -> dict:
        residuals = [part.up.residual for part in self.parts if isinstance(part.up, DeltaSender)]
        return {"residual": torch.cat(residuals)} if residuals else {}

    def load_state_dict(self, state: dict) -> None:
        if "residual" in state and isinstance(self.parts[0].up, DeltaSender):
            offset = 0
            for part in self.parts:
                n = part.up.residual.numel()
                part.up.residual.copy_(state["residual"][offset:offset + n])
                offset += n


class _Part:
    """One shard's message and reply (the whole exchange with one server rank)."""

    def __init__(self, send: torch.Tensor, reply: torch.Tensor, state: bool, wire: torch.dtype | Codec,
                 transfer: str, start: torch.Tensor) -> None:
        self.rule_send, self.rule_reply = send, reply
        self.codec = codec = wire if isinstance(wire, Codec) else None
        self.up = self.down = None  # a compressed format's two ends
        if codec is None:
            self.send = MPIBuffer(send, transfer, wire)
            self.reply = MPIBuffer(reply, transfer, wire)
            return
        n, device = send.numel(), send.device
        scratch = torch.empty(n, dtype=torch.float32, device=device)  # (both ends work in it, one at a time)
        self.up = StateSender(codec, start, scratch) if state else DeltaSender(codec, n, device)
        self.down = StateReceiver(codec, start, scratch)
        self.send = MPIBuffer(message_buffer(codec, n, device), transfer)
        self.reply = MPIBuffer(message_buffer(codec, n, device), transfer)

    @property
    def bytes_each_way(self) -> tuple[int, int]:
        return (self.send.sent.numel() * self.send.sent.element_size(),
                self.reply.sent.numel() * self.reply.sent.element_size())

    def before_send(self) -> torch.Tensor:
        if self.codec is None:
            self.send.before_send()
            return self.send.sent
        applied = self.up.encode(self.rule_send, self.send.tensor)
        self.send.before_send()
        return applied

    def after_recv(self) -> None:
        self.reply.after_recv()
        if self.codec is not None:
            self.rule_reply.copy_(self.down.decode(self.reply.tensor))


class ServerChannel:
    """The server's end of one worker's exchanges in a compressed format: the reference
    of its messages (state messages only) and of its replies. ``scratch``: a vector of the
    center's size that every channel works in (the server uses one at a time)."""

    def __init__(self, codec: Codec, center: torch.Tensor, state_messages: bool, scratch: torch.Tensor) -> None:
        self.up = StateReceiver(codec, center, scratch) if state_messages else None
        self.down = StateSender(codec, center, scratch)

    def reset(self, center: torch.Tensor) -> None:
        """A new process takes this worker's place, starting from ``center``."""
        for end in (self.up, self.down):
            if end is not None:
                end.reset(center)
