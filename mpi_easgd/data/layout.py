"""The dataset file layout: reading (validated) and writing (atomic).

Layout of a dataset file (all arrays in C order)::

    /train/images   uint8 [N, C, H, W]  (or float32, already scaled)
    /train/labels   int64 [N]           values in [0, num_classes)
    /test/images    uint8 [M, C, H, W]
    /test/labels    int64 [M]
    attrs: format = "mpi_easgd-dataset", version = 1, name, num_classes,
           mean, std  (float32 [C], per channel, of train images scaled to [0, 1])

Images are normalised on the fly: ``(x / 255 - mean) / std`` for uint8.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from mpi_easgd.fileio import atomic_path

FORMAT = "mpi_easgd-dataset"
VERSION = 1
SPLITS = ("train", "test")


class DataError(ValueError):
    """A dataset is missing or malformed (message names the file and the fix)."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset holds: an HDF5 file (read and validated by :func:`read_info`), or a
    user's datasets (:func:`mpi_easgd.data.factory.open_factory`: no path, no mean and std,
    the datasets themselves)."""

    path: Path | None
    name: str
    num_classes: int  # classes (a language model: its vocabulary; regression: a target's size)
    shape: tuple[int, ...]  # one input: C, H, W for images
    sizes: dict[str, int]
    mean: np.ndarray | None
    std: np.ndarray | None
    datasets: dict | None = None  # a user's: {"train": Dataset, "test": Dataset}
    target_shape: tuple[int, ...] = ()  # one target's (class indices: ())
    target_dtype: object = None  # one target's torch dtype (class indices: int64)


def read_info(path: str | Path, check_labels: bool = True) -> DatasetInfo:
    """Open ``path`` read-only and validate its layout; raise :class:`DataError` if bad."""
    path = Path(path)
    hint = "convert your data with 'python -m mpi_easgd.data convert' or use --dataset mnist5k"
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.h5"))
        raise DataError(f"{path} is a directory; pass the HDF5 dataset file itself"
                        + (f" ({', '.join(found[:5])} are there)" if found else
                           f", or convert the directory first with 'python -m mpi_easgd.data convert {path} OUT.h5'"))
    if not path.is_file():
        raise DataError(f"dataset file {path} not found; {hint}")
    if not h5py.is_hdf5(path):
        raise DataError(f"{path} is not an HDF5 file; {hint}")
    with open_hdf5(path) as f:
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
                lab = read_checked(path, labels, 0, len(labels))
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


def open_hdf5(path: Path) -> h5py.File:
    """``path`` opened for reading; a truncated or damaged file is a :class:`DataError`
    that names it (h5py's own message does not)."""
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path} is truncated or damaged, HDF5 cannot open it ({exc}); copy it again, or convert "
                        f"the data again with 'python -m mpi_easgd.data convert'") from None


def read_checked(path: Path, array: h5py.Dataset, a: int, b: int) -> np.ndarray:
    """``array[a:b]``; a chunk whose checksum does not match (or that cannot be read) is a
    :class:`DataError` that names the file, the array and where."""
    try:
        return array[a:b]
    except OSError as exc:
        where = f"{array.name.lstrip('/')}[{a}:{min(b, len(array))}]"
        raise DataError(f"{path}: {where} is damaged (its data does not match the checksum written with it: "
                        f"{exc}); the file changed after it was written: copy it again, or convert the data "
                        f"again") from None


def class_labels(y: np.ndarray, where: str) -> np.ndarray:
    """``y`` as int64 class indices; whole-number floats (labels read from a CSV) are
    indices too, any other float is refused (regression targets truncated to class 0 would
    train to a perfect, meaningless score)."""
    y = np.asarray(y)
    if np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_):
        return y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.floating):
        raise DataError(f"{where}: labels must be class indices (integers); got {y.dtype}")
    fractional = y[np.isfinite(y) & (y != np.round(y))] if len(y) else y
    if len(fractional) or not np.isfinite(y).all():
        example = fractional[0] if len(fractional) else y[~np.isfinite(y)][0]
        raise DataError(f"{where}: labels must be class indices (whole numbers); got {example:g} among them: "
                        f"this layout holds classification data, and float targets would be truncated")
    return y.astype(np.int64)


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
    labels = []
    for split, (x, y) in zip(SPLITS, (train, test)):
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"{split}: images must be [N, C, H, W] and labels [N] with the same N; got "
                f"{x.shape} and {y.shape}"
            )
        y = class_labels(y, split)
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"{split}: labels span [{y.min()}, {y.max()}], outside [0, {num_classes})")
        labels.append(y)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = train[0]
    scaled = images.astype(np.float64) / (255.0 if images.dtype == np.uint8 else 1.0)
    mean = scaled.mean(axis=(0, 2, 3)).astype(np.float32)
    std = scaled.std(axis=(0, 2, 3)).astype(np.float32)
    with atomic_path(path, unique=True) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(format=FORMAT, version=VERSION, name=name, num_classes=num_classes, mean=mean, std=std)
        for split, (x, _), y in zip(SPLITS, (train, test), labels):
            chunk = (max(1, min(len(x), 256)), *x.shape[1:])  # ~ the loader's batch reads
            # fletcher32: a checksum per chunk, checked by HDF5 at every read (a damaged file fails, named)
            f.create_dataset(f"{split}/images", data=x, chunks=chunk if len(x) else None, fletcher32=bool(len(x)))
            f.create_dataset(f"{split}/labels", data=y, chunks=(max(1, min(len(y), 65536)),) if len(y) else None,
                             fletcher32=bool(len(y)))
    return path


