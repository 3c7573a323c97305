"""One synchronous round's buffers: every rank's vector summed, started and finished apart.

:class:`RoundBuffer` holds a round's entries and a few flags (which ranks still step...)
and sums them over the communicator with a nonblocking collective, so that a round can be
started at one step and finished a few steps later (streaming DiLoCo), or at once. In a
floating format it is an ``Iallreduce`` in place (float16/bfloat16 added in float32 and
rounded once per addition, :func:`mpi_easgd.transfer.sum_op`); in a compressed one, a
:class:`GatheredSum`.

MPI cannot add int4 codes or top-k pieces, so a compressed round is an ``Allgather`` of
every rank's encoded message (a few float32 flags ride in the same message), then a local
sum of the decoded messages in rank order, in float32. Every rank adds the same bytes in
the same order: the sum is bitwise the same everywhere.

What it costs: a rank receives ``(p - 1) m`` bytes for a message of ``m`` bytes, where a
ring Allreduce of float32 receives ``2 (p - 1) / p * 4 n``. With int4 (``m`` about ``n /
2``) that is ``p / 16`` of the float32 Allreduce's bytes: 1/8 at 2 ranks, 1/4 at 4, 1/2 at
8, the same at 16, so past 16 ranks a gather of 4-bit messages moves more than float32 (the
decode-and-add also grows with ``p``). Top-k at 2% (``m`` about ``n / 22``) breaks even
near 170 ranks.
"""

from __future__ import annotations

import torch
from mpi4py import MPI

from mpi_easgd.compress import Codec, DeltaSender
from mpi_easgd.flat import flat_buffer
from mpi_easgd.transfer import MPIBuffer, iallreduce

FLAG_BYTES = 8  # room for two float32 flags


def ring_bytes(nbytes: int, ranks: int) -> int:
    """What a ring Allreduce of ``nbytes`` moves through each rank's link: ``2 (p - 1) / p``
    of the buffer."""
    return 2 * (ranks - 1) * nbytes // ranks


class GatheredSum:
    """Sum of every rank's ``x`` over ``comm`` in ``codec``'s format, with error feedback
    (``feedback=False`` drops what was left out). ``flags``: up to two small numbers per
    rank, summed exactly alongside."""

    def __init__(self, comm: MPI.Comm, codec: Codec, n: int, device: torch.device, transfer: str = "auto",
                 feedback: bool = True) -> None:
        self.comm, self.codec, self.n = comm, codec, n
        self.sender = DeltaSender(codec, n, device, feedback)
        self.size = codec.nbytes(n)
        self.message = torch.zeros(self.size + FLAG_BYTES, dtype=torch.uint8, device=device)
        self.gathered = torch.zeros(comm.Get_size() * self.message.numel(), dtype=torch.uint8, device=device)
        self._mine = MPIBuffer(self.message, transfer)
        self._all = MPIBuffer(self.gathered, transfer)
        self.total = torch.zeros(n, dtype=torch.float32, device=device)
        self._one = torch.empty(n, dtype=torch.float32, device=device)

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank hands MPI per round."""
        return self.message.numel()

    def start(self, x: torch.Tensor, flags: tuple[float, ...] = ()) -> MPI.Request:
        """Encode ``x`` and start the gather (nonblocking); :meth:`finish` once it completed."""
        self.sender.encode(x, self.message[:self.size])
        self.message[self.size:].view(torch.float32)[:] = torch.tensor([*flags, 0.0, 0.0][:2])
        self._mine.before_send()
        return self.comm.Iallgather(self._mine.mpi, self._all.mpi)

    def finish(self, flags: int = 2) -> tuple[torch.Tensor, list[float]]:
        """``(sum over ranks of the decoded messages, sum of each of the first ``flags``
        flags)`` of a completed gather."""
        self._all.after_recv()
        stride, sums = self.message.numel(), [0.0, 0.0]
        self.total.zero_()
        me = self.comm.Get_rank()
        for rank in range(self.comm.Get_size()):  # the same order on every rank: the same float32 sum
            piece = self.gathered[rank * stride:(rank + 1) * stride]
            # (this rank's own message was decoded when it was encoded: the same floats)
            self.total.add_(self.sender.sent if rank == me else self.codec.decode(piece[:self.size], self._one))
            got = piece[self.size:].view(torch.float32).tolist()
            sums = [a + b for a, b in zip(sums, got)]
        return self.total, sums[:flags]

    def state_dict(self) -> dict:
        return {"residual": self.sender.residual.clone()}

    def load_state_dict(self, state: dict) -> None:
        if "residual" in state and state["residual"].shape == self.sender.residual.shape:
            self.sender.residual.copy_(state["residual"])


class RoundBuffer:
    """A round of ``n`` float32 entries (fill :attr:`entries`, then :meth:`start`) and up to
    two flags, summed over ``comm`` in format ``wire`` (a floating dtype) or ``codec``
    (compressed, with error feedback unless ``feedback`` is False); :meth:`finish` waits
    and returns the sums. ``chunk_bytes``: the Allreduce's piece size."""

    def __init__(self, comm: MPI.Comm, n: int, device: torch.device, *, transfer: str, wire: torch.dtype,
                 codec: Codec | None, feedback: bool, chunk_bytes: int) -> None:
        self.comm, self.n, self.chunk_bytes = comm, n, chunk_bytes
        self.values = flat_buffer(n + 2, device)
        self.entries = self.values[:n]
        self.gather = GatheredSum(comm, codec, n, device, transfer, feedback) if codec else None
        self.mpi = None if codec else MPIBuffer(self.values, transfer, wire)
        self._requests: list[MPI.Request] = []
        self._flags = 0

    def start(self, flags: tuple[float, ...]) -> None:
        """Start summing :attr:`entries` and ``flags`` (nonblocking)."""
        self._flags = len(flags)
        if self.gather is not None:
            self._requests = [self.gather.start(self.entries, flags)]
            return
        self.values[self.n:self.n + len(flags)] = torch.tensor(flags)
        self.mpi.before_send()
        self._requests = iallreduce(self.comm, self.mpi, self.chunk_bytes)

    def progress(self) -> None:
        """Let MPI move the round on (it progresses only inside MPI calls): one ``Testall``."""
        if self._requests:
            MPI.Request.Testall(self._requests)

    def finish(self) -> tuple[torch.Tensor, list[float]]:
        """Wait for the round; ``(sum of the entries over ranks, sum of each flag)``."""
        MPI.Request.Waitall(self._requests)
        self._requests = []
        if self.gather is not None:
            return self.gather.finish(self._flags)
        self.mpi.after_recv()
        return self.entries, self.values[self.n:self.n + self._flags].tolist()

    def round_bytes(self) -> tuple[int, int]:
        """(bytes handed MPI to send, bytes handed back) in one round."""
        if self.gather is not None:  # every rank's message comes back
            return self.gather.bytes_sent, self.gather.bytes_sent * self.comm.Get_size()
        sent = self.mpi.sent.numel() * self.mpi.sent.element_size()
        return sent, sent

    def wire_bytes(self) -> int:
        """Bytes one round moves through each rank's link: a gather receives the other
        ranks' messages; a ring Allreduce ``2 (p - 1) / p`` of the buffer."""
        p, (sent, _) = self.comm.Get_size(), self.round_bytes()
        return (p - 1) * sent if self.gather is not None else ring_bytes(sent, p)

    def state_dict(self) -> dict:
        return self.gather.state_dict() if self.gather is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.gather is not None:
            self.gather.load_state_dict(state)
