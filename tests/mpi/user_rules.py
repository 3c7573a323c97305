"""A rule the package does not have, written against the public interface only, as a user
would in their own file: staleness-aware elastic averaging (after Zhang, Gupta, Lian, Liu
2016, "Staleness-aware Async-SGD"). The center's pull toward a worker shrinks with the
exchange's staleness (center updates by other workers since this worker's previous
exchange): ``c += alpha / (1 + staleness) * (x - c)``. The worker's side is EASGD's.

Run it with ``--algo user_rules:StalenessAwareEASGD`` (this folder on ``PYTHONPATH``).
"""

from __future__ import annotations

import torch

from mpi_easgd.rules.asynchronous import Arrival, ElasticWorker, ServerRule


class StalenessAwareEASGD(ServerRule):
    """Elastic averaging whose center pull is alpha / (1 + staleness)."""

    worker_rule = ElasticWorker
    settings = ("alpha",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.damped = 0  # exchanges applied with less than alpha: the rule's own state, checkpointed

    def apply(self, center: torch.Tensor, incoming: torch.Tensor,
              arrival: Arrival | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        staleness = arrival.staleness if arrival is not None else 0
        self.damped += staleness > 0
        # The new center over the incoming buffer; the old one, untouched, is the reply.
        return torch.lerp(center, incoming, self.alpha / (1 + staleness), out=incoming), center

    def state_dict(self) -> dict:
        return {"damped": self.damped}

    def load_state_dict(self, state: dict) -> None:
        self.damped = int(state.get("damped", 0))
