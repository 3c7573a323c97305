"""``python -m mpi_easgd.data``: convert datasets to the HDF5 layout, describe and verify them.

    python -m mpi_easgd.data convert SRC OUT.h5 [--format mnist|cifar10|cifar100|npz|folder]
    python -m mpi_easgd.data info FILE.h5
    python -m mpi_easgd.data verify FILE.h5

Bad input exits with status 2 and one line naming the problem; ``convert`` writes to a
temporary file and renames it on success, so an interrupted conversion leaves nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from mpi_easgd.data.convert import READERS, guess_format
from mpi_easgd.data.layout import DataError, open_hdf5, read_checked, read_info, write_dataset


def convert(src: Path, out: Path, fmt: str | None, name: str | None, labels: str) -> None:
    if not src.exists():
        raise DataError(f"{src} not found")
    fmt = fmt or guess_format(src)
    kwargs = {"labels": labels} if fmt == "cifar100" else {}
    train, test, num_classes = READERS[fmt](src, **kwargs)
    path = write_dataset(out, train, test, num_classes, name or out.stem)
    print(f"wrote {path}: {len(train[1])} train / {len(test[1])} test images of shape "
          f"{train[0].shape[1:]}, {num_classes} classes ({fmt})")


def info(path: Path) -> None:
    d = read_info(path)
    print(f"{path}  ({path.stat().st_size / 2**20:.1f} MiB)")
    print(f"  name {d.name}, {d.num_classes} classes, images {d.shape} (C, H, W)")
    print(f"  mean {np.round(d.mean, 4).tolist()}, std {np.round(d.std, 4).tolist()}")
    with h5py.File(path, "r") as f:
        for split in ("train", "test"):
            images = f[f"{split}/images"]
            counts = np.bincount(f[f"{split}/labels"][...], minlength=d.num_classes)
            print(f"  {split}: {d.sizes[split]} images, {images.dtype}, chunks {images.chunks}; "
                  f"per class min {counts.min()} max {counts.max()}")


def verify(path: Path) -> None:
    d = read_info(path)  # layout, shapes, label range
    with open_hdf5(path) as f:
        checked = all(f[f"{split}/{key}"].fletcher32 for split in ("train", "test") for key in ("images", "labels")
                      if len(f[f"{split}/{key}"]))
        for split in ("train", "test"):
            images = f[f"{split}/images"]
            step = 4096
            for a in tqdm(range(0, len(images), step), desc=f"verify {split}", leave=False, disable=None):
                block = read_checked(path, images, a, a + step)  # every byte, against its checksum
                if block.dtype.kind == "f" and not np.isfinite(block).all():
                    raise DataError(f"{path}: {split}/images has NaN or Inf values near index {a}")
            read_checked(path, f[f"{split}/labels"], 0, len(images))
    note = ("every chunk matches its checksum" if checked else
            "no checksums: written before mpi_easgd kept them; convert it again to have them")
    print(f"{path}: OK ({d.sizes['train']} train, {d.sizes['test']} test, {d.num_classes} classes; {note})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpi_easgd.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert MNIST IDX, CIFAR pickles, .npz or an image folder")
    c.add_argument("src", type=Path, help="source folder or .npz file")
    c.add_argument("out", type=Path, help="HDF5 file to write")
    c.add_argument("--format", choices=sorted(READERS), help="source format (default: guessed)")
    c.add_argument("--name", help="dataset name stored in the file (default: OUT's stem)")
    c.add_argument("--labels", choices=("fine", "coarse"), default="fine", help="CIFAR-100 labels")
    sub.add_parser("info", help="shapes, classes, counts per class, size").add_argument("file", type=Path)
    v = sub.add_parser("verify", help="check layout, labels, values; read every byte")
    v.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            convert(args.src, args.out, args.format, args.name, args.labels)
        elif args.command == "info":
            info(args.file)
        else:
            verify(args.file)
    except (DataError, OSError) as exc:
        print(f"mpi_easgd.data: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
