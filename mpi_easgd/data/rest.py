"""The rest of an epoch, re-sharded: every sample of it seen exactly once at another size.

When a run goes on with another number of ranks in the middle of an epoch (a resume at
another size, or the survivors of a death under ``--on-rank-loss shrink``), the epoch's
samples not seen yet (each old shard's order from the step it had reached on) form a
*pool*, and :class:`Rest` splits the pool over the new ranks: near-equal contiguous
slices, each read as sorted windows of about ``WINDOW`` samples shuffled within the window (so a
large HDF5 file is still read in contiguous blocks). The rest takes ``steps`` batches of
``batch`` samples per rank and ends where the new layout's epoch ends: it starts at step
``first`` = the new steps per epoch - ``steps``. A rank whose slice is shorter steps with
no batch (the loop's uneven-data contract). Later epochs use the new layout.

Everything here is a pure function of the indices, so every rank computes every rank's
slice without communication, and a checkpoint written in the rest of an epoch holds the
:class:`Rest` (:meth:`Rest.state_dict`): resumed at the same size it gives the same
batches; at yet another size, its own slices are the old orders of the next re-shard.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

WINDOW = 32768  # samples shuffled together in a rank's slice (as the streaming loader's window of blocks)


@dataclass(frozen=True, eq=False)
class Rest:
    """The unseen samples ``pool`` of epoch ``epoch``, split over ``count`` ranks from the
    epoch's step ``first`` on, ``batch`` samples per batch (see the module docstring)."""

    epoch: int
    pool: np.ndarray
    count: int
    first: int
    batch: int

    @property
    def steps(self) -> int:
        """Batches per rank in the rest (the longest slice's)."""
        longest = -(-len(self.pool) // self.count)
        return -(-longest // self.batch)

    def order(self, index: int, seed: int) -> np.ndarray:
        """Rank ``index``'s samples in the order its batches take them."""
        n = len(self.pool)
        mine = np.sort(self.pool[index * n // self.count:(index + 1) * n // self.count])
        rng, w = np.random.default_rng([seed, self.epoch, index, 2]), self.window
        return np.concatenate([mine[a:a + w][rng.permutation(len(mine[a:a + w]))] for a in range(0, len(mine), w)]
                              or [mine])

    @property
    def window(self) -> int:
        """Samples shuffled together: about ``WINDOW``, whole batches."""
        return self.batch * max(1, WINDOW // self.batch)

    def windows(self, index: int, seed: int, start: int) -> Iterator[tuple[int, np.ndarray]]:
        """Rank ``index``'s windows from the epoch's step ``start`` on: (the step of the
        window's first batch, its samples in the order its batches take them)."""
        order, per = self.order(index, seed), self.window // self.batch
        done = max(start - self.first, 0)  # batches taken already
        for a in range(done // per * self.window, len(order), self.window):
            skip = max(done * self.batch - a, 0)
            yield self.first + (a + skip) // self.batch, order[a + skip:a + self.window]

    def state_dict(self) -> dict:
        dtype = np.int32 if len(self.pool) and self.pool.max() < 2**31 else np.int64
        return dict(epoch=self.epoch, pool=self.pool.astype(dtype), count=self.count, first=self.first,
                    batch=self.batch)

    @classmethod
    def from_state(cls, state: dict | None) -> Rest | None:
        if not state:
            return None
        return cls(int(state["epoch"]), np.asarray(state["pool"], dtype=np.int64), int(state["count"]),
                   int(state["first"]), int(state["batch"]))


def unseen(orders: Sequence[np.ndarray], consumed: Sequence[int]) -> np.ndarray:
    """The pool: each old shard's samples (``orders[i]``, in the order it takes them) from
    its ``consumed[i]``-th on."""
    return np.concatenate([np.asarray(o[c:], dtype=np.int64) for o, c in zip(orders, consumed)] or
                          [np.zeros(0, np.int64)])


def rest_of_epoch(epoch: int, pool: np.ndarray, count: int, steps: int, batch: int) -> Rest:
    """Split ``pool`` over ``count`` ranks whose epochs have ``steps`` steps of ``batch``
    samples: ``batch`` per step, unless the pool needs more than ``steps`` steps of it
    (a few rounding samples when the old layout used more of the data): then as many more
    as fit it into ``steps``."""
    longest = -(-len(pool) // count)
    need = -(-longest // batch)
    if need > steps:
        need, batch = steps, -(-longest // max(steps, 1))
    return Rest(epoch, np.asarray(pool, dtype=np.int64), count, steps - need, batch)


def old_orders(loader_of, old: Rest | None, epoch: int, count: int, seed: int) -> list[np.ndarray]:
    """Each old rank's order in ``epoch``: its slice of ``old`` (the rest it was in), or its
    shard's order from ``loader_of(index)`` (a loader of the old layout, with ``order``)."""
    if old is not None and old.epoch == epoch:
        return [old.order(i, seed) for i in range(old.count)]
    return [loader_of(i).order(epoch) for i in range(count)]


def consumed(orders: Sequence[np.ndarray], step: int, old: Rest | None, epoch: int, batch: int) -> list[int]:
    """How many samples of its order each old rank had taken by the epoch's step ``step``."""
    first, size = (old.first, old.batch) if old is not None and old.epoch == epoch else (0, batch)
    return [min(max(step - first, 0) * size, len(o)) for o in orders]


class Resharded:
    """``loader`` (a :class:`~mpi_easgd.data.loader.ShardLoader` or a dataset loader, of the
    new layout) whose epoch ``rest.epoch`` is rank ``index``'s slice of ``rest``."""

    def __init__(self, loader, rest: Rest | None, index: int) -> None:
        self.loader, self.rest, self.index = loader, rest, index
        self.steps = loader.steps

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start: int = 0):
        """As the loader's :meth:`epoch`; in the rest's epoch, this rank's slice from step ``start``."""
        rest, loader = self.rest, self.loader
        if rest is None or epoch != rest.epoch:
            return loader.epoch(epoch, start)
        from mpi_easgd.data.loader import prefetch

        batches = (b for number, window in rest.windows(self.index, loader.seed, start)
                   for b in loader.take(window, rest.batch, epoch, number))
        return prefetch(batches, loader.prefetch) if loader.prefetch else batches
