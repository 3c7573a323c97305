"""The audit log of an async run (``--audit``): every exchange the server applied, in order.

``RUN_DIR/audit.npz`` holds the center and the server rule's state at the start, the
rule's settings, each exchange's worker index and payload (float32, as the server applied
it), and the final center. :func:`replay` feeds the payloads through the same pure rule
and returns the center it computes, which equals the run's final center bit for bit::

    from mpi_easgd.rules.audit import replay
    center, final = replay("runs/easgd-lenet-.../audit.npz")
    assert torch.equal(center, final)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mpi_easgd.rules.asynchronous import ServerRule, server_rule

STATE = "state_"  # prefix of the rule's initial state entries


class AuditLog:
    """What the server records with ``--audit``: the center and the rule's state at the
    start, then each exchange as the rule got it (worker index, float32 payload)."""

    def __init__(self, center: torch.Tensor, rule: ServerRule) -> None:
        self.initial = (center.clone(), rule.state_dict())
        self.exchanges: list[tuple[int, torch.Tensor]] = []

    def record(self, worker: int, payload: torch.Tensor) -> None:
        self.exchanges.append((worker, payload.to(torch.float32, copy=True)))

    def write(self, path: Path, rule: ServerRule, final: torch.Tensor) -> None:
        write(path, rule, self.initial, self.exchanges, final)


def write(path: Path, rule: ServerRule, initial: tuple[torch.Tensor, dict],
          exchanges: list[tuple[int, torch.Tensor]], final: torch.Tensor) -> None:
    """Write the log of a server's run (``initial``: its center and rule state at the start)."""
    center, state = initial
    order = np.array([i for i, _ in exchanges], dtype=np.int64)
    payloads = torch.stack([x for _, x in exchanges]).numpy() if exchanges else np.zeros((0, center.numel()))
    entries = {STATE + k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in state.items()}
    np.savez(path, initial=center.numpy(), final=final.numpy(), order=order, payloads=payloads,
             rule=json.dumps(rule.params()), **entries)


def replay(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(replayed center, the run's final center)`` from an audit log."""
    log = np.load(path)
    rule = server_rule(**json.loads(str(log["rule"])))
    state = {k[len(STATE):]: torch.from_numpy(log[k]) if log[k].ndim else log[k].item()
             for k in log.files if k.startswith(STATE)}
    rule.load_state_dict(state)
    center = torch.from_numpy(log["initial"]).clone()
    for payload in log["payloads"]:
        center, _ = rule.apply(center, torch.from_numpy(payload.copy()))
    return center, torch.from_numpy(log["final"])
