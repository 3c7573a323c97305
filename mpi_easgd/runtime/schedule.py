"""When a periodic checkpoint is due (``--checkpoint-every``), as a pure state machine (no
MPI): the synchronous runs' :class:`~mpi_easgd.runtime.control.Control` and the async
server both ask it."""

from __future__ import annotations

import time

from mpi_easgd.config import parse_every


class Schedule:
    """When a periodic checkpoint is due: every N steps (async: center updates) or every T
    seconds, counted from the last checkpoint (``--checkpoint-every``; "" never)."""

    def __init__(self, every: str, step: int = 0, now: float | None = None) -> None:
        self.every_steps, self.every_seconds = parse_every(every)
        self.mark(step, time.monotonic() if now is None else now)

    def mark(self, step: int, now: float) -> None:
        self.last_step, self.last_time = step, now

    def due(self, step: int, now: float) -> bool:
        if step == self.last_step:
            return False
        if self.every_steps:
            return step - self.last_step >= self.every_steps
        return self.every_seconds is not None and now - self.last_time >= self.every_seconds
