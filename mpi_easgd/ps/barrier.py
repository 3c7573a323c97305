"""The async checkpoint barrier, as a pure state machine (no MPI).

The server asks every worker still in the run to save (``begin``); each answers SAVED with
whether its file is on disk (``saved``), or is lost meanwhile (``lost``). When nobody is
left to answer, the checkpoint is complete: the server writes its own part and commits it,
unless a worker's write failed. No exchange is applied while a checkpoint is in progress.
"""

from __future__ import annotations

import enum
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
