"""The update rules as pure functions on flat float32 tensors (no MPI).

Every function writes into caller-owned buffers so the hot path allocates nothing. The
server and worker sides of an exchange call the same :func:`elastic_difference` on the
same inputs, so both apply bitwise the same difference (the paper's symmetric update).
"""

from __future__ import annotations

import torch


def elastic_difference(x: torch.Tensor, c: torch.Tensor, alpha: float, out: torch.Tensor):
    """``out = alpha * (x - c)``."""
    torch.sub(x, c, out=out)
    out.mul_(alpha)
    return out


def ea_local_move(x: torch.Tensor, c: torch.Tensor, alpha: float, diff: torch.Tensor):
    """Synchronous EA on one rank: ``diff = alpha (x - c)``; ``x -= diff``; returns ``diff``
    (to be summed across ranks and added to every copy of ``c``)."""
    elastic_difference(x, c, alpha, diff)
    x.sub_(diff)
    return diff


def easgd_server_update(
    center: torch.Tensor, x: torch.Tensor, alpha: float, reply: torch.Tensor, scratch: torch.Tensor
) -> None:
    """Async EASGD, server side of one exchange with parameters ``x``:
    ``reply = c``; ``c += alpha (x - reply)``."""
    reply.copy_(center)
    center.add_(elastic_difference(x, reply, alpha, scratch))


def easgd_worker_update(x: torch.Tensor, c: torch.Tensor, alpha: float, scratch: torch.Tensor):
    """Async EASGD, worker side: ``x -= alpha (x - c)`` with ``c`` the server's reply."""
    x.sub_(elastic_difference(x, c, alpha, scratch))


def downpour_server_update(center: torch.Tensor, delta: torch.Tensor, reply: torch.Tensor):
    """DOWNPOUR, server side: ``c += delta``; ``reply = c``."""
    center.add_(delta)
    reply.copy_(center)
