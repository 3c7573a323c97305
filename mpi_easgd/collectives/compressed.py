"""A synchronous round in a compressed format: every rank's message gathered, summed alike.

MPI cannot add int4 codes or top-k pieces, so a compressed round is an ``Allgather`` of
every rank's encoded message (a few float32 flags ride in the same message), then a local
sum of the decoded messages in rank order, in float32. Every rank adds the same bytes in
the same order: the sum is bitwise the same everywhere.

What it costs: a rank receives ``(p - 1) m`` bytes for a message of ``m`` bytes, where a
ring Allreduce of float32 receives ``2 (p - 1) / p * 4 n``. With int4 (``m`` about ``n /
2``) that is ``p / 16`` of the float32 Allreduce's bytes: 1/8 at 2 ranks, 1/4 at 4, 1/2 at
8, the same at 16, so past 16 ranks a gather of 4-bit messages moves more than float32 (the
decode-and-add also grows with ``p``). Top-k at 2% (``m`` about ``n / 22``) breaks even
near 180 ranks.
"""

from __future__ import annotations

import torch
from mpi4py import MPI

from mpi_easgd.compress import Codec, DeltaSender
from mpi_easgd.transfer import MPIBuffer

FLAG_BYTES = 8  # room for two float32 flags


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

    def __call__(self, x: torch.Tensor, flags: tuple[float, ...] = ()) -> tuple[torch.Tensor, list[float]]:
        """``(sum over ranks of the decoded messages, sum of each flag)``."""
        self.sender.encode(x, self.message[:self.size])
        self.message[self.size:].view(torch.float32)[:] = torch.tensor([*flags, 0.0, 0.0][:2])
        self._mine.before_send()
        self.comm.Allgather(self._mine.mpi, self._all.mpi)
        self._all.after_recv()
        stride, sums = self.message.numel(), [0.0, 0.0]
        self.total.zero_()
        for rank in range(self.comm.Get_size()):  # the same order on every rank: the same float32 sum
            piece = self.gathered[rank * stride:(rank + 1) * stride]
            self.total.add_(self.codec.decode(piece[:self.size], self._one))
            got = piece[self.size:].view(torch.float32).tolist()
            sums = [a + b for a, b in zip(sums, got)]
        return self.total, sums[:len(flags)]

    def state_dict(self) -> dict:
        return {"residual": self.sender.residual.clone()}

    def load_state_dict(self, state: dict) -> None:
        if "residual" in state and state["residual"].shape == self.sender.residual.shape:
            self.sender.residual.copy_(state["residual"])
