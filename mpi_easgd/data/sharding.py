"""Sharding as pure functions of (dataset length, shard index, shard count)."""

from __future__ import annotations

from mpi_easgd.data.layout import DataError


def shard_range(n: int, index: int, count: int, even: bool = True) -> tuple[int, int]:
    """The contiguous ``[start, stop)`` of ``n`` samples that shard ``index`` of ``count`` owns.

    ``even``: every shard gets ``n // count`` samples (the remainder is dropped) so every
    rank takes the same number of steps. Otherwise shard sizes differ by at most one and
    together cover all ``n`` samples.
    """
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} out of range for {count} shards")
    if n < count:
        raise DataError(f"{n} samples cannot be split into {count} shards; use fewer ranks")
    if even:
        size = n // count
        return index * size, (index + 1) * size
    return index * n // count, (index + 1) * n // count


def num_batches(length: int, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch for a shard of ``length`` samples."""
    return length // batch_size if drop_last else -(-length // batch_size)


def rank_batch(global_batch: int, count: int) -> int:
    """Each of ``count`` ranks' batch that keeps a global batch of ``global_batch`` samples:
    its share, rounded to the nearest sample (so the global batch is kept to within
    ``count / 2`` samples: 64 over 3 ranks is 3 x 21)."""
    return max(1, round(global_batch / count))


def steps_per_epoch(n: int, count: int, batch_size: int, even: bool) -> list[int]:
    """Every shard's steps per epoch, computable on any rank without communication."""
    return [
        num_batches(stop - start, batch_size, drop_last=even)
        for start, stop in (shard_range(n, i, count, even) for i in range(count))
    ]
