"""Message tags and small control-message layouts between server, workers and tester.

Parameters always travel as raw float32 buffers (never pickled), one message each way per
exchange; control messages carry small int64 arrays on their own tags.
"""

from __future__ import annotations

import time
from enum import IntEnum

import numpy as np
from mpi4py import MPI


class Tag(IntEnum):
    EXCHANGE = 11  # worker -> server: float32[n] payload (parameters, or DOWNPOUR's delta)
    REPLY = 12  # server -> worker: float32[n] center
    DONE = 13  # worker -> server: int64[DONE_LEN] (exchanges, steps, samples, stopped early)
    SNAPSHOT_META = 14  # server -> tester: int64[META_LEN] (kind, updates, samples)
    SNAPSHOT = 15  # server -> tester: float32[n] center


class Kind(IntEnum):
    """First field of a snapshot's meta message."""

    SNAPSHOT = 1  # evaluate and keep going
    FINAL = 2  # the final center: evaluate, save, summarise, exit


DONE_LEN = 4
META_LEN = 3


def done_message(exchanges: int, steps: int, samples: int, stopped: bool) -> np.ndarray:
    return np.array([exchanges, steps, samples, int(stopped)], dtype=np.int64)


def meta_message(kind: Kind, updates: int, samples: int) -> np.ndarray:
    return np.array([int(kind), updates, samples], dtype=np.int64)


def wait_politely(requests: list[MPI.Request], deadline: float = float("inf")) -> bool:
    """Wait for ``requests`` without spinning (test, then sleep with a growing back-off up
    to 20 ms, so a waiting rank leaves the CPU to ranks that compute) until the
    ``time.monotonic()`` deadline; True if they completed."""
    delay = 1e-4
    while not MPI.Request.Testall(requests):
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return True
