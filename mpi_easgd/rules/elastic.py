"""The update rules as pure functions on flat float32 tensors (no MPI).

Every function writes into caller-owned buffers so the hot path allocates nothing. The
server-side functions never write the current center: they write the new center over the
incoming message, so the old center can be on its way to a worker at the same time.
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


def easgd_server_update(center: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Async EASGD, server side of one exchange with parameters ``x``: the new center
    ``c + alpha (x - c)`` is written over ``x`` (one fused pass) and returned; ``center``
    itself is not written, so it can be sent to the worker as its reply meanwhile."""
    return torch.lerp(center, x, alpha, out=x)


def easgd_worker_update(x: torch.Tensor, c: torch.Tensor, alpha: float, sent: torch.Tensor | None = None) -> None:
    """Async EASGD, worker side: ``x -= alpha (sent - c)`` with ``c`` the server's reply to
    the parameters ``sent``. Blocking exchange: ``sent`` is ``x`` itself (``None``), so
    ``x -= alpha (x - c)``. Overlapped exchange: ``sent`` is the snapshot of ``x`` that
    travelled, and the steps taken since stay in ``x``; ``sent`` is overwritten."""
    if sent is None or sent is x:
        x.lerp_(c, alpha)
    else:
        x.sub_(sent.sub_(c), alpha=alpha)


def restart_from_center(x: torch.Tensor, c: torch.Tensor, sent: torch.Tensor | None = None) -> None:
    """DOWNPOUR and async DiLoCo, worker side: ``x = c + (x - sent)``, ``sent`` the
    parameters the message was made from. Blocking exchange (``sent`` is ``x`` or ``None``):
    ``x = c``. Overlapped: the steps taken since the send are kept on top of the new
    center; ``sent`` is overwritten."""
    if sent is None or sent is x:
        x.copy_(c)
    else:
        x.sub_(sent.sub_(c))


def downpour_server_update(center: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """DOWNPOUR, server side: the new center ``c + delta`` is written over ``delta`` and
    returned (it is also the reply); ``center`` is not written."""
    return delta.add_(center)


def delayed_nesterov_update(center: torch.Tensor, g: torch.Tensor, momentum: torch.Tensor,
                            pending: torch.Tensor, milestone: bool, lr: float, beta: float,
                            delay: int, mean_of: int | None = None) -> torch.Tensor:
    """Async DiLoCo, server side: one push of the pseudo-gradient ``g`` through the delayed
    Nesterov outer optimizer (Liu et al. 2024, Algorithm 3 with c = 0)::

        pending += g
        if milestone (every delay-th push):  momentum = beta * momentum + pending / delay;  pending = 0
        new center = center - lr * g / delay  [- lr * beta * momentum  at a milestone]

    Over ``delay`` pushes the center moves by ``-lr (mean g + beta * momentum)``: one
    Nesterov step (torch's form) on the mean pseudo-gradient, while every push still moves
    the center at once. ``delay = 1`` is plain Nesterov SGD on every push. ``mean_of``: the
    pushes pending at a milestone, when rounds vary in length (a quorum; default ``delay``).
    The new center is written over ``g`` and returned; ``center`` is not written."""
    pending.add_(g)
    if milestone:
        momentum.mul_(beta).add_(pending, alpha=1.0 / (mean_of or delay))
        pending.zero_()
    new = g.mul_(-lr / delay).add_(center)
    if milestone:
        new.add_(momentum, alpha=-lr * beta)
    return new
