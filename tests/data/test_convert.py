"""Converters on fixture files written in the real formats; bad inputs fail cleanly."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import make_cifar
from PIL import Image

from mpi_easgd.data import read_info
from mpi_easgd.data.__main__ import main
from mpi_easgd.data.layout import write_dataset

RNG = np.random.default_rng(0)


def write_idx(path, array, gz=False):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def make_mnist(folder, n_train=30, n_test=10, gz=False):
    folder.mkdir()
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = np.arange(n) % 10
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", x, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", y, gz)
        arrays[prefix] = (x[:, None], y)
    return arrays


def h5_arrays(path, split):
    with h5py.File(path) as f:
        return f[f"{split}/images"][...], f[f"{split}/labels"][...]


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path, gz):
    src = make_mnist(tmp_path / "mnist", gz=gz)
    assert main(["convert", str(tmp_path / "mnist"), str(tmp_path / "m.h5")]) == 0
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = h5_arrays(tmp_path / "m.h5", split)
        assert np.array_equal(x, src[prefix][0]) and np.array_equal(y, src[prefix][1])
    assert read_info(tmp_path / "m.h5").num_classes == 10


def test_cifar10_and_cifar100_round_trip(tmp_path):
    src = make_cifar(tmp_path / "c10")
    assert main(["convert", str(tmp_path / "c10"), str(tmp_path / "c10.h5")]) == 0
    x, y = h5_arrays(tmp_path / "c10.h5", "train")
    assert np.array_equal(x, np.concatenate([src[f"data_batch_{i}"][0] for i in range(1, 6)]))
    assert np.array_equal(y, np.concatenate([src[f"data_batch_{i}"][1] for i in range(1, 6)]))
    info = read_info(tmp_path / "c10.h5")
    assert info.shape == (3, 32, 32) and info.sizes == {"train": 40, "test": 10}
    src = make_cifar(tmp_path / "c100", hundred=True)
    assert main(["convert", str(tmp_path / "c100"), str(tmp_path / "c100.h5"), "--labels", "coarse"]) == 0
    x, y = h5_arrays(tmp_path / "c100.h5", "test")
    assert np.array_equal(x, src["test"][0]) and np.array_equal(y, np.arange(10) % 20)
    assert read_info(tmp_path / "c100.h5").num_classes == 20


def test_npz_nhwc_round_trip(tmp_path):
    x = RNG.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.arange(12) % 3, x_test=x[:4], y_test=np.arange(4) % 3)
    assert main(["convert", str(tmp_path / "d.npz"), str(tmp_path / "d.h5")]) == 0
    got, y = h5_arrays(tmp_path / "d.h5", "train")
    assert np.array_equal(got, x.transpose(0, 3, 1, 2)) and np.array_equal(y, np.arange(12) % 3)


def make_folder(root, per_class=3):
    images = {}
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                arr = RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / cls / f"{i}.png")
                images[(split, cls, i)] = arr
    return images


def test_image_folder_round_trip(tmp_path):
    images = make_folder(tmp_path / "imgs")
    assert main(["convert", str(tmp_path / "imgs"), str(tmp_path / "f.h5")]) == 0
    x, y = h5_arrays(tmp_path / "f.h5", "train")
    assert x.shape == (6, 3, 10, 12) and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(x[4], images[("train", "dog", 1)].transpose(2, 0, 1))


def _bad_cases(tmp_path):
    """(name, source) pairs that must each fail with one line and no output file."""
    make_mnist(tmp_path / "truncated")
    p = tmp_path / "truncated" / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    make_mnist(tmp_path / "magic")
    p = tmp_path / "magic" / "t10k-labels-idx1-ubyte"
    p.write_bytes(b"\x12\x34" + p.read_bytes()[2:])
    make_mnist(tmp_path / "counts")
    write_idx(tmp_path / "counts" / "train-labels-idx1-ubyte", np.zeros(29, np.uint8))
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "test" / "a").mkdir(parents=True)
    make_folder(tmp_path / "unreadable", per_class=1)
    (tmp_path / "unreadable" / "train" / "cat" / "bad.png").write_bytes(b"not a png")
    (tmp_path / "nofolders").mkdir()
    make_folder(tmp_path / "stray", per_class=1)
    (tmp_path / "stray" / "test" / "dgo").mkdir()  # a typo: no train folder of that name
    x = np.zeros((4, 8, 8), np.uint8)
    np.savez(tmp_path / "cut.npz", x_train=x, y_train=np.zeros(4), x_test=x, y_test=np.zeros(4))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "cut.npz").read_bytes()[:300])
    return [
        ("test class without a train folder", "stray", "class folders ['dgo'] have no folder in"),
        ("truncated npz", "cut.npz", "not a .npz archive"),
        ("truncated IDX", "truncated", "truncated or padded IDX data"),
        ("wrong magic", "magic", "not an IDX file (bad magic number"),
        ("mismatched counts", "counts", "train has 30 images but 29 labels"),
        ("empty folder", "empty", "no images found"),
        ("unreadable image", "unreadable", "bad.png: unreadable image"),
        ("unknown layout", "nofolders", "cannot tell the format"),
    ]


def test_bad_inputs_fail_with_one_line_and_leave_nothing(tmp_path, capsys):
    for name, src, message in _bad_cases(tmp_path):
        out = tmp_path / f"{src}.h5"
        assert main(["convert", str(tmp_path / src), str(out)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mpi_easgd.data: error:"), (name, err)
        assert message in err[0], (name, err)
        assert not out.exists() and not list(tmp_path.glob(f".{src}.h5.*")), name


def test_info_and_verify_cli(tmp_path, blobs):
    # the real command line, once
    ok = subprocess.run([sys.executable, "-m", "mpi_easgd.data", "verify", str(blobs)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "OK (512 train, 128 test, 4 classes; every chunk matches its checksum)" in ok.stdout
    info = subprocess.run([sys.executable, "-m", "mpi_easgd.data", "info", str(blobs)],
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0 and "4 classes" in info.stdout and "per class" in info.stdout
    with h5py.File(tmp_path / "nan.h5", "w") as f:
        f.attrs["num_classes"] = 2
        for s in ("train", "test"):
            f[f"{s}/images"] = np.full((3, 1, 2, 2), np.nan, np.float32)
            f[f"{s}/labels"] = np.zeros(3, np.int64)
    assert main(["verify", str(tmp_path / "nan.h5")]) == 2
    truncated = tmp_path / "cut.h5"
    truncated.write_bytes(blobs.read_bytes()[:20000])
    assert main(["verify", str(truncated)]) == 2


def test_a_damaged_dataset_is_found_and_named_not_trained_on(tmp_path, capsys):
    """200 KB overwritten in the middle of a dataset we wrote: verify, the loader and a
    run each say which file and array, in one line; a truncated file is named too."""
    from mpi_easgd.data import read_info, shard_loader
    from mpi_easgd.data.layout import DataError

    rng = np.random.default_rng(0)
    path = write_dataset(tmp_path / "d.h5", (rng.integers(0, 255, (4000, 1, 28, 28), dtype=np.uint8),
                                              rng.integers(0, 10, 4000)),
                         (rng.integers(0, 255, (100, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, 100)), 10, "d")
    assert main(["verify", str(path)]) == 0
    assert "every chunk matches its checksum" in capsys.readouterr().out
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 200_000] = rng.integers(0, 255, 200_000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(raw))
    assert main(["verify", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}: train/images[" in err[0] and "is damaged" in err[0], err
    assert "allow_pickle" not in err[0]
    with pytest.raises(DataError, match=r"train/images\[\d+:\d+\] is damaged"):
        loader = shard_loader(read_info(path), "train", batch_size=64, memory_limit=0)
        for _ in loader.epoch(0):
            pass
    cut = tmp_path / "cut.h5"
    cut.write_bytes(bytes(raw[: len(raw) // 3]))
    with pytest.raises(DataError, match=f"{cut} is truncated or damaged"):
        read_info(cut)


def test_a_text_file_named_npz_gets_no_unsafe_advice(tmp_path, capsys):
    (tmp_path / "t.npz").write_text("x_train,y_train\n1,2\n")
    assert main(["convert", str(tmp_path / "t.npz"), str(tmp_path / "t.h5")]) == 2
    err = capsys.readouterr().err
    assert "not a .npz archive" in err and "allow_pickle" not in err and "unsafe" not in err
