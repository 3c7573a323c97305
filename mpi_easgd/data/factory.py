"""A user's datasets: ``--dataset package.module:factory``, any ``torch.utils.data.Dataset``.

The factory is called with no arguments and returns ``(train, test)``, two datasets whose
items are ``(input, target)`` pairs of tensors (or numbers). Inputs and targets keep their
types: integer tokens reach the model as integers, float targets stay floats; nothing is
normalised. A dataset may say ``num_classes`` (classes, or a language model's vocabulary
size) as an attribute; for regression it is the size of a target.

:class:`DatasetLoader` shards, shuffles (seeded per epoch), batches (``default_collate``)
and resumes mid-epoch exactly as :class:`~.loader.ShardLoader` does for an HDF5 file, so
sharding, uneven endings, checkpoints of the data position and the tester work the same.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import default_collate

from mpi_easgd.data.layout import DataError, DatasetInfo
from mpi_easgd.data.loader import prefetch
from mpi_easgd.data.sharding import num_batches, shard_range

Batch = tuple[torch.Tensor, torch.Tensor]


def open_factory(name: str) -> DatasetInfo:
    """Call the factory ``package.module:factory`` and describe what it returned (one line
    of :class:`DataError` for anything that cannot be used)."""
    from mpi_easgd.registry import load_user_object

    factory = load_user_object(name, "--dataset", DataError)
    try:
        made = factory()
    except Exception as exc:  # noqa: BLE001 - the user's factory failed: one line, no traceback
        raise DataError(f"--dataset {name}: factory() failed ({type(exc).__name__}: {exc})") from None
    if not (isinstance(made, tuple | list) and len(made) == 2):
        raise DataError(f"--dataset {name}: factory() must return (train, test) datasets; got {type(made).__name__}")
    for split, data in zip(("train", "test"), made):
        if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
            raise DataError(f"--dataset {name}: its {split} set is a {type(data).__name__}, not a dataset "
                            f"(a torch.utils.data.Dataset with __len__ and __getitem__)")
        if not len(data):
            raise DataError(f"--dataset {name}: its {split} set is empty")
    return describe(name, *made)


def describe(name: str, train, test) -> DatasetInfo:
    """What a pair of datasets holds (its first item's input and target say the shapes)."""
    try:
        x, y = (torch.as_tensor(v) for v in train[0])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"--dataset {name}: an item must be an (input, target) pair of tensors ({exc})") from None
    classes = getattr(train, "num_classes", None)
    if classes is None:
        classes = int(np.prod(y.shape)) if y.is_floating_point() else 0
    return DatasetInfo(path=None, name=name, num_classes=int(classes), shape=tuple(x.shape),
                       sizes={"train": len(train), "test": len(test)}, mean=None, std=None,
                       datasets={"train": train, "test": test}, target_shape=tuple(y.shape),
                       target_dtype=y.dtype)


class DatasetLoader:
    """Mini-batches of one shard of one split of a user's dataset, reshuffled every epoch
    (seeded); the same contract as :class:`~.loader.ShardLoader` (``steps``,
    :meth:`epoch`)."""

    def __init__(self, info: DatasetInfo, split: str, index: int = 0, count: int = 1, *, batch_size: int,
                 seed: int = 0, shuffle: bool = True, even: bool = True, drop_last: bool | None = None,
                 prefetch: int = 2, augment: bool = False, **_) -> None:
        if augment:
            raise DataError("--augment crops and flips HDF5 images; a dataset factory's items are its own")
        self.info, self.split, self.index = info, split, index
        self.dataset = info.datasets[split]
        self.batch_size, self.seed, self.shuffle, self.prefetch = batch_size, seed, shuffle, prefetch
        self.drop_last = even if drop_last is None else drop_last
        self.start, self.stop = shard_range(len(self.dataset), index, count, even)
        self.steps = num_batches(self.stop - self.start, batch_size, self.drop_last)

    def __len__(self) -> int:
        return self.steps

    def order(self, epoch: int) -> np.ndarray:
        """The items (indices into the dataset) that epoch ``epoch`` takes, in the order
        its batches take them: what :mod:`~mpi_easgd.data.rest` re-shards from."""
        order = np.arange(self.start, self.stop)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, self.index]).permutation(order)
        return order[: self.steps * self.batch_size]

    def take(self, indices: np.ndarray, batch: int, epoch: int = 0, number: int = 0) -> Iterator[Batch]:
        """The items ``indices`` (in that order) as batches of ``batch``."""
        for a in range(0, len(indices), batch):
            x, y = default_collate([self.dataset[int(i)] for i in indices[a:a + batch]])
            yield torch.as_tensor(x), torch.as_tensor(y)

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.take(self.order(epoch)[start * self.batch_size:], self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's batches ``(inputs, targets)`` from batch ``start`` on (to resume
        mid-epoch), prepared ``self.prefetch`` batches ahead in a thread."""
        batches = self._batches(epoch, start)
        return prefetch(batches, self.prefetch) if self.prefetch else batches
