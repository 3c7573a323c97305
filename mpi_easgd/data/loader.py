"""Mini-batches of one shard, reshuffled every epoch.

Shuffling never uses random (fancy-indexed) HDF5 reads, which are ~1000x slower than
contiguous ones: a shard that fits in memory is read once with one contiguous read and
shuffled in memory; a larger one is read in contiguous blocks whose order is shuffled and
whose samples are shuffled within a window of blocks.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from mpi_easgd.data.layout import DatasetInfo, open_hdf5, read_checked
from mpi_easgd.data.sharding import num_batches, shard_range

Batch = tuple[torch.Tensor, torch.Tensor]


class ShardLoader:
    """Mini-batches of one shard of one split, reshuffled every epoch (seeded).

    ``index``/``count`` select the shard; ``drop_last`` drops a final partial batch.
    ``memory_limit`` (bytes) decides between reading the shard into memory once and
    streaming it in shuffled contiguous blocks. ``augment`` applies random crops and
    flips; ``prefetch`` batches are prepared ahead in a background thread (0: none).
    """

    def __init__(
        self,
        info: DatasetInfo,
        split: str,
        index: int = 0,
        count: int = 1,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        even: bool = True,
        drop_last: bool | None = None,
        memory_limit: int = 2 << 30,
        block: int = 4096,
        augment: bool = False,
        prefetch: int = 2,
    ) -> None:
        self.info = info
        self.split = split
        self.index = index
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.augment = augment
        self.prefetch = prefetch
        self.drop_last = even if drop_last is None else drop_last
        self.start, self.stop = shard_range(info.sizes[split], index, count, even)
        self.length = self.stop - self.start
        self.steps = num_batches(self.length, batch_size, self.drop_last)
        self.block = max(block, batch_size)
        self._mean = torch.from_numpy(info.mean).view(1, -1, 1, 1)
        self._std = torch.from_numpy(info.std).view(1, -1, 1, 1)
        with open_hdf5(info.path) as f:
            images = f[f"{split}/images"]
            self._uint8 = images.dtype == np.uint8
            nbytes = self.length * int(np.prod(images.shape[1:])) * images.dtype.itemsize
        self.in_memory = nbytes <= memory_limit
        self._memory = None  # (read at the first epoch: a loader made only for its order reads nothing)

    def __len__(self) -> int:
        return self.steps

    def _plan(self, rng: np.random.Generator) -> Iterator[tuple[list[tuple[int, int]], np.ndarray]]:
        """This epoch's windows: (the contiguous ranges to read, the order of their samples)."""
        if self.in_memory:
            yield [(self.start, self.stop)], rng.permutation(self.length) if self.shuffle else np.arange(self.length)
            return
        starts = np.arange(self.start, self.stop, self.block)
        if self.shuffle:
            starts = rng.permutation(starts)
        window = 8  # blocks shuffled together: 8 * 4096 samples in memory at a time
        for i in range(0, len(starts), window):
            parts = [(int(s), min(int(s) + self.block, self.stop)) for s in starts[i : i + window]]
            n = sum(b - a for a, b in parts)
            yield parts, rng.permutation(n) if self.shuffle else np.arange(n)

    def _windows(self, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Sample arrays in this epoch's order, one window at a time."""
        if self.in_memory and self._memory is None:
            with open_hdf5(self.info.path) as f:
                self._memory = tuple(read_checked(self.info.path, f[f"{self.split}/{name}"], self.start, self.stop)
                                     for name in ("images", "labels"))
        if self._memory is not None:
            for _, order in self._plan(rng):
                yield self._memory[0][order], self._memory[1][order]
            return
        with open_hdf5(self.info.path) as f:
            images, labels = f[f"{self.split}/images"], f[f"{self.split}/labels"]
            for parts, order in self._plan(rng):
                x = np.concatenate([read_checked(self.info.path, images, a, b) for a, b in parts])
                y = np.concatenate([read_checked(self.info.path, labels, a, b) for a, b in parts])
                yield x[order], y[order]

    def order(self, epoch: int) -> np.ndarray:
        """The samples (indices into the split) that epoch ``epoch`` takes, in the order its
        batches take them: what :mod:`~mpi_easgd.data.rest` re-shards from."""
        rng = np.random.default_rng([self.seed, epoch, self.index])
        order = np.concatenate([np.concatenate([np.arange(a, b) for a, b in parts])[o] for parts, o in self._plan(rng)])
        return order[: self.steps * self.batch_size]

    def take(self, indices: np.ndarray, batch: int, epoch: int, number: int) -> Iterator[Batch]:
        """The samples ``indices`` (in that order) as prepared batches of ``batch``, the
        first one the epoch's step ``number``; read in the contiguous blocks they fall in."""
        rank = np.argsort(indices, kind="stable")
        wanted = indices[rank]
        xs, ys = [], []
        with open_hdf5(self.info.path) as f:
            images, labels = f[f"{self.split}/images"], f[f"{self.split}/labels"]
            for a in np.unique(wanted // self.block) * self.block:
                b = min(int(a) + self.block, self.info.sizes[self.split])
                inside = wanted[(wanted >= a) & (wanted < b)] - a
                xs.append(read_checked(self.info.path, images, int(a), b)[inside])
                ys.append(read_checked(self.info.path, labels, int(a), b)[inside])
        back = np.empty_like(rank)
        back[rank] = np.arange(len(rank))
        x, y = np.concatenate(xs)[back], np.concatenate(ys)[back]
        for n, a in enumerate(range(0, len(y), batch), number):
            yield self._prepare(x[a : a + batch], y[a : a + batch], epoch, n)

    def to_tensor(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).float()
        if self._uint8:
            x.mul_(1.0 / 255.0)
        return x.sub_(self._mean).div_(self._std)

    def _raw_batches(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This epoch's ``self.steps`` batches as numpy arrays, in shuffled order."""
        rng = np.random.default_rng([self.seed, epoch, self.index])
        carry_x, carry_y, emitted = None, None, 0
        for x, y in self._windows(rng):
            if carry_x is not None:
                x, y = np.concatenate([carry_x, x]), np.concatenate([carry_y, y])
            full = len(y) // self.batch_size * self.batch_size
            for a in range(0, full, self.batch_size):
                if emitted == self.steps:
                    return
                yield x[a : a + self.batch_size], y[a : a + self.batch_size]
                emitted += 1
            carry_x, carry_y = x[full:], y[full:]
        if emitted < self.steps and carry_x is not None and len(carry_y):
            yield carry_x, carry_y

    def _prepare(self, x: np.ndarray, y: np.ndarray, epoch: int, number: int):
        if self.augment:
            # Seeded per batch, not per stream, so a run resumed mid-epoch sees the same crops.
            x = augment_batch(x, np.random.default_rng([self.seed, epoch, self.index, number, 1]))
        return self.to_tensor(x), torch.from_numpy(np.ascontiguousarray(y))

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this epoch's batches ``(images float32, labels int64)`` from batch ``start``
        on (to resume mid-epoch), prepared ``self.prefetch`` batches ahead in a thread."""
        raw = itertools.islice(self._raw_batches(epoch), start, None)
        batches = (self._prepare(x, y, epoch, n) for n, (x, y) in enumerate(raw, start))
        return prefetch(batches, self.prefetch) if self.prefetch else batches


def augment_batch(x: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Random crop after zero-padding by ``pad`` pixels, and a random horizontal flip, per
    sample (the standard CIFAR augmentation), vectorised over the batch."""
    n, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(2, 3))
    dy = rng.integers(0, 2 * pad + 1, n)
    dx = rng.integers(0, 2 * pad + 1, n)
    out = windows[np.arange(n), :, dy, dx]  # (n, c, h, w)
    flip = rng.random(n) < 0.5
    out[flip] = out[flip][..., ::-1]
    return out


_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetch(iterable, depth: int) -> Iterator:
    """Run ``iterable`` in a background thread, ``depth`` items ahead of the consumer.

    An exception in the thread is re-raised in the consumer; a consumer that stops early
    stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in iterable:
                if not put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(_Failure(exc))
            return
        put(_END)

    thread = threading.Thread(target=work, name="mpi_easgd-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        # Join, so that no thread is still inside torch when the interpreter shuts down
        # (that aborts the process with "terminate called without an active exception").
        thread.join(timeout=10)
