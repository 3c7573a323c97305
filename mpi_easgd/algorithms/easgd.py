"""What differs between EASGD, EAMSGD and DOWNPOUR: one small rule object each side.

The server loop (:mod:`.server`) and the worker loop (:mod:`.worker`) are shared; they ask
a :class:`ServerRule` how to apply one exchange to the center, and a worker-side rule what
to send and how to take in the reply.

- EASGD / EAMSGD (the paper's Algorithms 1 and 2; EAMSGD differs only in the worker's local
  optimizer, Nesterov momentum): the worker sends ``x``, the server replies with ``c``
  (its value *before* the pull) and both apply ``alpha (x - c)`` in opposite directions.
- DOWNPOUR: the worker sends its accumulated update ``x - x_at_last_sync``; the server adds
  it and replies with the new ``c``, which replaces ``x``.
"""

from __future__ import annotations

import torch

from mpi_easgd.algorithms.elastic import (
    downpour_server_update,
    easgd_server_update,
    easgd_worker_update,
)
from mpi_easgd.flat import flat_like


class ServerRule:
    """Apply one exchange to the center; see :meth:`apply`."""

    def __init__(self, algo: str, alpha: float) -> None:
        self.algo = algo
        self.alpha = alpha

    def apply(self, center: torch.Tensor, incoming: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(new center, reply)`` for a worker's message ``incoming``, which is overwritten
        with the new center. EASGD replies with the old ``center``, DOWNPOUR with the new one.
        ``center`` is never written: it may still be in flight to another worker."""
        if self.algo == "downpour":
            new = downpour_server_update(center, incoming)
            return new, new
        return easgd_server_update(center, incoming, self.alpha), center


class ElasticWorker:
    """EASGD/EAMSGD worker side: send ``x``; on reply ``c``: ``x -= alpha (x - c)``."""

    def __init__(self, x: torch.Tensor, alpha: float) -> None:
        self.x = x
        self.alpha = alpha
        self.send = x  # sent straight from the flat parameters: no copy
        self.reply = flat_like(x)

    def prepare(self) -> None:
        """Fill ``self.send`` (nothing to do: it is ``x``)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def absorb(self) -> None:
        easgd_worker_update(self.x, self.reply, self.alpha)


class DownpourWorker:
    """DOWNPOUR worker side: send ``x - anchor``; on reply ``c``: ``x = anchor = c``."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.anchor = flat_like(x).copy_(x)
        self.send = flat_like(x)
        self.reply = flat_like(x)

    def prepare(self) -> None:
        """Fill ``self.send`` with the update accumulated since the last exchange."""
        torch.sub(self.x, self.anchor, out=self.send)

    def state_dict(self) -> dict:
        return {"anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        self.anchor.copy_(state["anchor"])

    def absorb(self) -> None:
        self.x.copy_(self.reply)
        self.anchor.copy_(self.reply)


def worker_rule(algo: str, x: torch.Tensor, alpha: float) -> ElasticWorker | DownpourWorker:
    return DownpourWorker(x) if algo == "downpour" else ElasticWorker(x, alpha)
