"""The async checkpoint barrier and the checkpoint schedule, as pure state machines (no MPI).

The server asks every worker still in the run to save (``begin``); each answers SAVED with
whether its file is on disk (``saved``), or is lost meanwhile (``lost``). When nobody is
left to answer, the checkpoint is complete: the server writes its own part and commits it,
unless a worker's write failed. No exchange is applied while a checkpoint is in progress.
"""

from __future__ import annotations

import enum
import re
import time


class Phase(enum.Enum):
    IDLE = "idle"  # no checkpoint in progress
    SAVING = "saving"  # waiting for workers' SAVED answers


class CheckpointBarrier:
    """``begin(step, members)`` -> whom to ask; ``saved(i, ok)`` / ``lost(i)`` -> whether the
    checkpoint is now complete; ``finish()`` -> (step, every file written) and back to IDLE."""

    def __init__(self) -> None:
        self.phase = Phase.IDLE
        self.step = 0
        self.awaiting: set[int] = set()
        self._failed = False
        self._started = 0.0

    def begin(self, step: int, members: set[int]) -> set[int]:
        if self.phase is not Phase.IDLE:
            raise RuntimeError("a checkpoint is already in progress")
        self.phase, self.step, self.awaiting, self._failed = Phase.SAVING, step, set(members), False
        self._started = time.perf_counter()
        return set(members)

    @property
    def complete(self) -> bool:
        return self.phase is Phase.SAVING and not self.awaiting

    def saved(self, i: int, ok: bool) -> bool:
        if i not in self.awaiting:
            raise RuntimeError(f"worker {i} answered SAVED for no checkpoint it was asked for")
        self.awaiting.discard(i)
        self._failed = self._failed or not ok
        return self.complete

    def lost(self, i: int) -> bool:
        self.awaiting.discard(i)
        return self.complete

    def finish(self) -> tuple[int, bool, float]:
        """(step, every worker's file written, seconds since begin); the barrier is IDLE again."""
        if not self.complete:
            raise RuntimeError("the checkpoint is not complete")
        self.phase = Phase.IDLE
        return self.step, not self._failed, time.perf_counter() - self._started


SECONDS = {"s": 1, "m": 60, "h": 3600}


def parse_every(text: str) -> tuple[int | None, float | None]:
    """``"500"`` -> every 500 steps; ``"1h"`` / ``"10m"`` / ``"30s"`` -> every 3600 / 600 / 30 seconds."""
    if not text:
        return None, None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([hms]?)\s*", text)
    if not m or float(m.group(1)) <= 0 or (not m.group(2) and "." in m.group(1)):
        raise ValueError(f"--checkpoint-every must be a number of steps (500) or a time (1h, 10m, 30s); "
                         f"got '{text}'")
    value, unit = float(m.group(1)), m.group(2)
    if not unit:
        return int(value), None
    return None, value * SECONDS[unit]


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
