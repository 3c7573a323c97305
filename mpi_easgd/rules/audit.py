"""The audit log of an async run (``--audit``): every exchange the server applied, in order.

``RUN_DIR/audit.npz`` holds the center and the server rule's state at the start, the
rule's settings, each exchange's arrival (worker index, staleness, center version, time) and
payload (float32, as the server applied it), and the final center. :func:`replay` feeds
the payloads through the same pure rule and returns the center it computes, which equals
the run's final center bit for bit::

    from mpi_easgd.rules.audit import replay
    center, final = replay("runs/easgd-lenet-.../audit.npz")
    assert torch.equal(center, final)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mpi_easgd.rules.asynchronous import Arrival, ServerRule, server_rule

STATE = "state_"  # prefix of the rule's initial state entries


class AuditLog:
    """What the server records with ``--audit``: the center and the rule's state at the
    start, then each exchange as the rule got it (its :class:`Arrival`, the float32
    payload)."""

    def __init__(self, center: torch.Tensor, rule: ServerRule) -> None:
        self.initial = (center.clone(), rule.state_dict())
        self.exchanges: list[tuple[Arrival, torch.Tensor]] = []

    def record(self, arrival: Arrival, payload: torch.Tensor) -> None:
        self.exchanges.append((arrival, payload.to(torch.float32, copy=True)))

    def write(self, path: Path, rule: ServerRule, final: torch.Tensor) -> None:
        """Write the log of a server's run, ending at center ``final``."""
        center, state = self.initial
        arrivals = [a for a, _ in self.exchanges]
        payloads = (torch.stack([x for _, x in self.exchanges]).numpy() if self.exchanges
                    else np.zeros((0, center.numel()), dtype=np.float32))
        entries = {STATE + k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in state.items()}
        np.savez(path, initial=center.numpy(), final=final.numpy(), payloads=payloads, rule=json.dumps(rule.params()),
                 order=np.array([a.worker for a in arrivals], dtype=np.int64),
                 staleness=np.array([a.staleness for a in arrivals], dtype=np.int64),
                 versions=np.array([a.version for a in arrivals], dtype=np.int64),
                 times=np.array([a.time for a in arrivals], dtype=np.float64), **entries)


def replay(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(replayed center, the run's final center)`` from an audit log: every payload
    through the run's rule (rebuilt from its settings, a user's rule imported by its
    name), with the arrival it had."""
    log = np.load(path)
    rule = server_rule(**json.loads(str(log["rule"])))  # (older logs have no max_staleness: 0)
    state = {k[len(STATE):]: torch.from_numpy(log[k]) if log[k].ndim else log[k].item()
             for k in log.files if k.startswith(STATE)}
    rule.load_state_dict(state)
    center = torch.from_numpy(log["initial"]).clone()
    n = len(log["payloads"])
    staleness = log["staleness"] if "staleness" in log.files else np.zeros(n, dtype=np.int64)  # (older logs)
    versions = log["versions"] if "versions" in log.files else np.arange(n)
    times = log["times"] if "times" in log.files else np.zeros(n)
    for payload, worker, stale, version, when in zip(log["payloads"], log["order"], staleness, versions, times):
        arrival = Arrival(int(worker), int(stale), int(version), float(when))
        center, _ = rule.exchange(center, torch.from_numpy(payload.copy()), arrival)
    return center, torch.from_numpy(log["final"])
