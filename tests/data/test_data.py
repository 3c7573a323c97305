"""Sharding, the HDF5 layout checks, the loader and the built-in dataset (no MPI)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from mpi_easgd.data import (
    DataError,
    ShardLoader,
    build_mnist5k,
    read_info,
    resolve_dataset,
    shard_range,
    steps_per_epoch,
    write_dataset,
)
from mpi_easgd.data.__main__ import main as data_main


@pytest.mark.parametrize("n,count", [(10, 3), (4000, 4), (7, 7), (1000, 6)])
def test_uneven_shards_cover_everything_once(n, count):
    ranges = [shard_range(n, i, count, even=False) for i in range(count)]
    covered = np.concatenate([np.arange(a, b) for a, b in ranges])
    assert np.array_equal(covered, np.arange(n))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n,count", [(10, 3), (4000, 4), (1001, 4)])
def test_even_shards_are_equal_and_disjoint(n, count):
    ranges = [shard_range(n, i, count) for i in range(count)]
    assert len({b - a for a, b in ranges}) == 1
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(count - 1))
    assert ranges[-1][1] <= n


def test_shard_errors():
    with pytest.raises(DataError, match="cannot be split into 5 shards"):
        shard_range(4, 0, 5)
    with pytest.raises(ValueError):
        shard_range(10, 3, 3)


def test_steps_per_epoch_even_and_uneven():
    assert steps_per_epoch(100, 3, 10, even=True) == [3, 3, 3]
    assert steps_per_epoch(100, 3, 10, even=False) == [4, 4, 4]  # 33, 33, 34 samples
    assert steps_per_epoch(95, 3, 11, even=False) == [3, 3, 3]
    assert steps_per_epoch(64, 3, 10, even=False) == [3, 3, 3]
    assert steps_per_epoch(61, 3, 10, even=False) == [2, 2, 3]  # 20, 20, 21 samples


def _labels_seen(loader, epoch):
    return np.concatenate([y.numpy() for _, y in loader.epoch(epoch)])


@pytest.mark.parametrize("memory_limit", [2 << 30, 0])  # in memory, and streamed in blocks
def test_loader_yields_every_sample_once_per_epoch(tmp_path, memory_limit):
    n = 1000
    x = np.zeros((n, 1, 2, 2), dtype=np.uint8)
    y = np.arange(n) % 7
    ids = np.arange(n)
    x[:, 0, 0, 0] = ids % 256  # recover each sample's identity from its pixels
    x[:, 0, 0, 1] = ids // 256
    path = write_dataset(tmp_path / "ids.h5", (x, y), (x[:10], y[:10]), num_classes=7, name="ids")
    info = read_info(path)
    shards = []
    for index in range(3):
        loader = ShardLoader(info, "train", index, 3, batch_size=32, seed=5, even=False,
                             memory_limit=memory_limit, block=100)
        seen = []
        for epoch in range(2):
            batch_ids = []
            for images, labels in loader.epoch(epoch):
                raw = (images * torch.from_numpy(info.std).view(1, -1, 1, 1)
                       + torch.from_numpy(info.mean).view(1, -1, 1, 1)) * 255
                pid = raw[:, 0, 0, 0].round().long() + 256 * raw[:, 0, 0, 1].round().long()
                assert torch.equal(labels, pid % 7)
                batch_ids.append(pid.numpy())
            ids_epoch = np.concatenate(batch_ids)
            assert sorted(ids_epoch) == list(range(loader.start, loader.stop))
            seen.append(ids_epoch)
        assert not np.array_equal(seen[0], seen[1]), "order must change across epochs"
        again = ShardLoader(info, "train", index, 3, batch_size=32, seed=5, even=False,
                            memory_limit=memory_limit, block=100)
        assert np.array_equal(_labels_seen(again, 1), _labels_seen(loader, 1)), "seeded"
        shards.append(set(np.concatenate(seen)))
    assert set().union(*shards) == set(range(n))


def test_even_loader_drops_the_partial_batch(blobs):
    info = read_info(blobs)
    loader = ShardLoader(info, "train", 1, 3, batch_size=50, seed=0)
    batches = list(loader.epoch(0))
    assert len(batches) == loader.steps == (512 // 3) // 50
    assert all(len(y) == 50 for _, y in batches)


def test_normalisation_uses_stored_mean_and_std(blobs):
    info = read_info(blobs)
    loader = ShardLoader(info, "train", batch_size=512, seed=0, shuffle=False)
    (x, _), = list(loader.epoch(0))
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2


def test_bad_files_give_clear_errors(tmp_path, blobs):
    with pytest.raises(DataError, match="not found"):
        read_info(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(DataError, match="not an HDF5 file"):
        read_info(tmp_path / "text.h5")
    with h5py.File(tmp_path / "partial.h5", "w") as f:
        f.attrs["num_classes"] = 3
        f["train/images"] = np.zeros((4, 1, 2, 2), np.uint8)
        f["train/labels"] = np.zeros(4, np.int64)
    with pytest.raises(DataError, match="no 'test/images' array"):
        read_info(tmp_path / "partial.h5")
    with h5py.File(tmp_path / "shape.h5", "w") as f:
        f.attrs["num_classes"] = 3
        for s in ("train", "test"):
            f[f"{s}/images"] = np.zeros((4, 2, 2), np.uint8)
            f[f"{s}/labels"] = np.zeros(4, np.int64)
    with pytest.raises(DataError, match=r"must be \[N, C, H, W\]"):
        read_info(tmp_path / "shape.h5")
    with h5py.File(tmp_path / "labels.h5", "w") as f:  # written by hand: the writer refuses it
        f.attrs["num_classes"] = 3
        for s, labels in (("train", [0, 1, 2, 5]), ("test", [0, 0, 0, 0])):
            f[f"{s}/images"] = np.zeros((4, 1, 2, 2), np.uint8)
            f[f"{s}/labels"] = np.array(labels, np.int64)
    with pytest.raises(DataError, match=r"labels span \[0, 5\] but num_classes is 3"):
        read_info(tmp_path / "labels.h5")


def test_write_dataset_checks_its_inputs(tmp_path):
    x = np.zeros((4, 1, 2, 2), np.uint8)
    with pytest.raises(DataError, match="same N"):
        write_dataset(tmp_path / "d.h5", (x, np.zeros(3)), (x, np.zeros(4)), 3, "bad")
    with pytest.raises(DataError, match=r"test: labels span \[7, 7\], outside \[0, 3\)"):
        write_dataset(tmp_path / "d.h5", (x, np.zeros(4)), (x, np.full(4, 7)), 3, "bad")
    assert list(tmp_path.iterdir()) == []


def test_write_dataset_leaves_nothing_when_writing_fails(tmp_path, monkeypatch):
    calls = []
    real = h5py.Group.create_dataset

    def fail_third(self, *args, **kwargs):  # a full disk part-way through the file
        calls.append(args[0])
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", fail_third)
    x = np.zeros((4, 1, 2, 2), np.uint8)
    with pytest.raises(OSError, match="No space left"):
        write_dataset(tmp_path / "d.h5", (x, np.zeros(4)), (x, np.zeros(4)), 3, "ok")
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []


def test_mnist5k_is_real_fixed_and_stratified(tmp_path, dataset_cache):
    path = resolve_dataset("mnist5k")
    info = read_info(path)
    assert info.sizes == {"train": 4000, "test": 1000}
    assert info.shape == (1, 28, 28) and info.num_classes == 10
    with h5py.File(path) as f:
        train_y, test_y = f["train/labels"][...], f["test/labels"][...]
        first = f["train/images"][:64]
    assert np.bincount(train_y).tolist() == [400] * 10
    assert np.bincount(test_y).tolist() == [100] * 10
    assert len(set(train_y[:400].tolist())) == 10, "file order must be shuffled, not by class"
    assert 0.05 < first.mean() / 255 < 0.25  # real digits: mostly dark background
    again = build_mnist5k(tmp_path / "again.h5")
    with h5py.File(again) as f, h5py.File(path) as g:
        assert np.array_equal(f["train/labels"][...], g["train/labels"][...]), "fixed split"


def test_augmentation_crops_and_flips_but_keeps_content():
    from mpi_easgd.data.loader import augment_batch

    x = np.arange(2 * 3 * 8 * 8, dtype=np.uint8).reshape(2, 3, 8, 8)
    rng = np.random.default_rng(0)
    outs = [augment_batch(x, rng) for _ in range(20)]
    assert all(o.shape == x.shape and o.dtype == np.uint8 for o in outs)
    assert any(not np.array_equal(o, x) for o in outs)
    for o in outs:  # every output pixel is an input pixel of the same sample/channel, or padding
        for i in range(2):
            assert set(np.unique(o[i])) <= set(np.unique(x[i])) | {0}
    same = augment_batch(x, np.random.default_rng(7)), augment_batch(x, np.random.default_rng(7))
    assert np.array_equal(*same)


def test_resuming_mid_epoch_gives_the_same_batches(blobs):
    info = read_info(blobs)
    loader = ShardLoader(info, "train", 0, 2, batch_size=16, seed=3, augment=True)
    full = list(loader.epoch(4))
    tail = list(loader.epoch(4, start=5))
    assert len(tail) == len(full) - 5
    for (a, b), (c, d) in zip(full[5:], tail):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_prefetch_passes_errors_and_stops_early():
    from mpi_easgd.data.loader import prefetch

    def items():
        yield 1
        yield 2
        raise RuntimeError("broken file")

    it = prefetch(items(), 2)
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(RuntimeError, match="broken file"):
        next(it)
    endless = prefetch(iter(int, 1), 2)  # never ends
    assert next(endless) == 0
    endless.close()  # must not hang


def test_float_targets_are_refused_not_truncated(tmp_path, capsys):
    """Regression targets in [0, 1) given as labels were stored as int64 zeros, and training
    then reported a perfect score: a float that is not a whole number is refused in one
    line, by the writer and by the converter; whole-number floats are class indices."""
    x = np.zeros((4, 1, 2, 2), np.uint8)
    targets = np.array([0.1, 0.5, 0.9, 0.3])
    with pytest.raises(DataError, match="train: labels must be class indices .* got 0.1") as error:
        write_dataset(tmp_path / "d.h5", (x, targets), (x, targets), 1, "regression")
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []
    np.savez(tmp_path / "r.npz", x_train=x, y_train=targets, x_test=x, y_test=targets)
    assert data_main(["convert", str(tmp_path / "r.npz"), str(tmp_path / "r.h5")]) == 2
    assert "labels must be class indices" in capsys.readouterr().err and not (tmp_path / "r.h5").exists()
    whole = np.array([0.0, 1.0, 2.0, 1.0])  # as read from a CSV
    info = read_info(write_dataset(tmp_path / "w.h5", (x, whole), (x, whole), 3, "whole"))
    with h5py.File(info.path) as f:
        assert f["train/labels"].dtype == np.int64 and f["train/labels"][...].tolist() == [0, 1, 2, 1]
