"""Readers that turn common dataset formats into ``(train, test, num_classes)`` arrays.

Each reader returns images as uint8 ``[N, C, H, W]`` and labels as int64 ``[N]``, or raises
:class:`DataError` with a one-line reason. None needs the internet: they read files that
are already on disk (torchvision's downloaded folders included, they use these formats).

- ``mnist``: a folder with the four IDX files (``train-images-idx3-ubyte`` etc., optionally
  ``.gz``), as MNIST, Fashion-MNIST and KMNIST ship them.
- ``cifar10`` / ``cifar100``: the python pickle batches (``cifar-10-batches-py``:
  ``data_batch_1..5``, ``test_batch``; ``cifar-100-python``: ``train``, ``test``).
- ``npz``: one ``.npz`` with ``x_train, y_train, x_test, y_test`` (images NCHW, NHWC or NHW).
- ``folder``: ``ROOT/train/CLASS/*.png|jpg...`` and ``ROOT/test/CLASS/...``, all images
  of one size (classes are the sorted train subfolder names).
"""

from __future__ import annotations

import gzip
import pickle
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mpi_easgd.data.layout import DataError, class_labels

Arrays = tuple[np.ndarray, np.ndarray]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}


# ---- MNIST IDX -------------------------------------------------------------------------

IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (``.gz`` or raw): magic ``0 0 TYPE NDIM``, NDIM big-endian sizes, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_TYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: truncated or padded IDX data ({len(raw) - header} bytes for shape {dims}, "
            f"expected {expected})"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise DataError(f"{folder}: no {stem}[.gz] (expected the four MNIST IDX files)")


def read_mnist(src: Path) -> tuple[Arrays, Arrays, int]:
    def split(prefix: str) -> Arrays:
        x = read_idx(_find(src, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_find(src, f"{prefix}-labels-idx1-ubyte"))
        if x.ndim != 3 or y.ndim != 1:
            raise DataError(f"{src}: {prefix} images must be 3-d and labels 1-d IDX arrays")
        if len(x) != len(y):
            raise DataError(f"{src}: {prefix} has {len(x)} images but {len(y)} labels")
        return x[:, None].astype(np.uint8), y.astype(np.int64)

    train, test = split("train"), split("t10k")
    return train, test, int(max(train[1].max(), test[1].max())) + 1


# ---- CIFAR python pickles ----------------------------------------------------------------


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path} not found (expected CIFAR python batches)")
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="bytes")
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from None


def _cifar_arrays(batches: list[dict], key: bytes, path: Path) -> Arrays:
    try:
        x = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
        y = np.concatenate([np.asarray(b[key], dtype=np.int64) for b in batches])
    except KeyError as exc:
        raise DataError(f"{path}: CIFAR batch without {exc} entry") from None
    if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
        raise DataError(f"{path}: CIFAR data must be [N, 3072] with N labels; got {x.shape}, {y.shape}")
    return x.reshape(-1, 3, 32, 32), y


def read_cifar10(src: Path) -> tuple[Arrays, Arrays, int]:
    train = [_unpickle(src / f"data_batch_{i}") for i in range(1, 6)]
    test = [_unpickle(src / "test_batch")]
    return _cifar_arrays(train, b"labels", src), _cifar_arrays(test, b"labels", src), 10


def read_cifar100(src: Path, labels: str = "fine") -> tuple[Arrays, Arrays, int]:
    key = b"fine_labels" if labels == "fine" else b"coarse_labels"
    train = _cifar_arrays([_unpickle(src / "train")], key, src)
    test = _cifar_arrays([_unpickle(src / "test")], key, src)
    return train, test, 100 if labels == "fine" else 20


# ---- npz -----------------------------------------------------------------------------------


def to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    """NHW -> N1HW; NHWC (C in 1, 3, 4) -> NCHW; NCHW unchanged."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if x.ndim == 4:
        return x
    raise DataError(f"{where}: images must be [N, H, W], [N, H, W, C] or [N, C, H, W]; got {x.shape}")


def read_npz(src: Path) -> tuple[Arrays, Arrays, int]:
    # A truncated or damaged archive fails on opening or on reading a member, in several ways.
    damaged = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
    if not zipfile.is_zipfile(src):  # else numpy takes it for a pickle and advises loading it unsafely
        raise DataError(f"{src}: not a .npz archive (a .npz is a zip of .npy arrays, as numpy.savez writes it: "
                        f"np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)); truncated or not one")
    try:
        data = np.load(src, allow_pickle=False)
        arrays = {k: data[k] for k in ("x_train", "y_train", "x_test", "y_test") if k in data.files}
    except damaged as exc:
        raise DataError(f"{src}: not a readable .npz, truncated or damaged ({type(exc).__name__}: {exc}); "
                        f"write it again with numpy.savez") from None
    missing = {"x_train", "y_train", "x_test", "y_test"} - set(arrays)
    if missing:
        raise DataError(f"{src}: missing arrays {sorted(missing)} (need x_train, y_train, x_test, y_test)")
    out = []
    for split in ("train", "test"):
        x, y = to_nchw(arrays[f"x_{split}"], f"{src} x_{split}"), arrays[f"y_{split}"].reshape(-1)
        if len(x) != len(y):
            raise DataError(f"{src}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels")
        if x.dtype != np.uint8:
            x = x.astype(np.float32)
            if x.max() > 1.0:
                raise DataError(f"{src}: float images must be scaled to [0, 1] (or stored as uint8)")
        out.append((x, class_labels(y, f"{src} y_{split}")))
    return out[0], out[1], int(max(out[0][1].max(), out[1][1].max())) + 1


# ---- image folders -------------------------------------------------------------------------


def read_folder(src: Path) -> tuple[Arrays, Arrays, int]:
    from PIL import Image, UnidentifiedImageError

    train_dir = src / "train"
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir()) if train_dir.is_dir() else []
    if not classes:
        raise DataError(f"{src}: expected class subfolders in {train_dir} (ROOT/train/CLASS/image.png)")
    test_dir = src / "test"
    strays = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in classes) \
        if test_dir.is_dir() else []
    if strays:
        raise DataError(f"{test_dir}: class folders {strays} have no folder in {train_dir} (a typo?); the classes "
                        f"are the train folders {classes}: rename or remove them")

    def split(name: str) -> Arrays:
        files = [(f, c) for c, cls in enumerate(classes) for f in sorted((src / name / cls).glob("*"))
                 if f.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise DataError(f"{src / name}: no images found in the class subfolders {classes}")
        images, shape, mode = [], None, None
        for f, _ in tqdm(files, desc=f"reading {name}", unit="img", leave=False, disable=None):
            try:
                with Image.open(f) as im:
                    mode = mode or ("L" if im.mode in ("L", "1", "I;16") else "RGB")
                    arr = np.asarray(im.convert(mode))
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"{f}: unreadable image ({exc})") from None
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            if shape is not None and arr.shape != shape:
                raise DataError(f"{f}: size {arr.shape} differs from {shape}; resize all images to one size")
            shape = arr.shape
            images.append(arr)
        return np.stack(images).astype(np.uint8), np.array([c for _, c in files], dtype=np.int64)

    return split("train"), split("test"), len(classes)


READERS: dict[str, Callable[..., tuple[Arrays, Arrays, int]]] = {
    "mnist": read_mnist,
    "cifar10": read_cifar10,
    "cifar100": read_cifar100,
    "npz": read_npz,
    "folder": read_folder,
}


def guess_format(src: Path) -> str:
    """The format of ``src`` from the files it holds."""
    if src.is_file() and src.suffix == ".npz":
        return "npz"
    if src.is_dir():
        names = {p.name for p in src.iterdir()}
        if any(n.startswith("train-images-idx3-ubyte") for n in names):
            return "mnist"
        if "data_batch_1" in names:
            return "cifar10"
        if {"train", "test"} <= names and (src / "train").is_file():
            return "cifar100"
        if (src / "train").is_dir():
            return "folder"
    raise DataError(f"cannot tell the format of {src}; pass --format {{{','.join(READERS)}}}")
