"""The rest of an epoch re-sharded over another number of ranks: each sample once.

The loaders here read a real HDF5 file whose label is each sample's index, so what a
loader yields says which samples it took.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from mpi_easgd.data import read_info, shard_loader, write_dataset
from mpi_easgd.data.factory import describe
from mpi_easgd.data.rest import Resharded, Rest, consumed, old_orders, rest_of_epoch, unseen
from mpi_easgd.data.sharding import steps_per_epoch

N, B, SEED = 1000, 16, 3


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """An HDF5 file of N samples whose label is the sample's index."""
    path = tmp_path_factory.mktemp("rest") / "indexed.h5"
    x = np.random.default_rng(0).integers(0, 256, size=(N, 1, 2, 2)).astype(np.uint8)
    return read_info(write_dataset(path, (x, np.arange(N)), (x[:10], np.arange(10)), num_classes=N, name="i"))


def loader(info, index, count, even=True, **options):
    return shard_loader(info, "train", index, count, batch_size=B, seed=SEED, even=even, prefetch=0, **options)


def taken(batches) -> list[int]:
    return [int(i) for _, y in batches for i in y]


@pytest.mark.parametrize("memory_limit", [1 << 30, 0], ids=["in-memory", "streamed"])
def test_an_epochs_order_is_what_its_batches_take(indexed, memory_limit):
    for index, count, even in ((0, 3, True), (2, 3, False)):
        shard = loader(indexed, index, count, even, memory_limit=memory_limit, block=64)
        assert shard.in_memory == bool(memory_limit)
        for epoch in (0, 1):
            assert taken(shard.epoch(epoch)) == shard.order(epoch).tolist()
            assert taken(shard.epoch(epoch, 5)) == shard.order(epoch)[5 * B:].tolist()


def test_a_datasets_order_is_what_its_batches_take():
    data = [(torch.zeros(2), i) for i in range(100)]
    info = describe("mine", data, data[:10])
    shard = shard_loader(info, "train", 1, 3, batch_size=8, seed=SEED, prefetch=0)
    assert taken(shard.epoch(2)) == shard.order(2).tolist()
    assert taken(shard.epoch(2, 3)) == shard.order(2)[24:].tolist()


def resize(info, old: int, new: int, step: int, epoch: int = 1, old_rest: Rest | None = None, even=True):
    """What the ranks of a run re-sharded from ``old`` to ``new`` ranks at ``step`` of
    ``epoch`` take in that epoch: (taken before, taken after, the old layout's epoch, the rest)."""
    orders = old_orders(lambda i: loader(info, i, old, even), old_rest, epoch, old, SEED)
    done = consumed(orders, step, old_rest, epoch, B)
    first = old_rest.first if old_rest is not None else 0
    before = []  # what the old ranks' loaders yielded in the epoch's steps before ``step``
    for index in range(old):
        batches = Resharded(loader(info, index, old, even), old_rest, index).epoch(epoch, first)
        before += taken(itertools.islice(batches, step - first))
    steps = max(steps_per_epoch(N, new, B, even))
    rest = rest_of_epoch(epoch, unseen(orders, done), new, steps, B)
    after = []
    for index in range(new):
        yielded = list(Resharded(loader(info, index, new, even), rest, index).epoch(epoch, rest.first))
        assert len(yielded) <= steps - rest.first, "the rest ends where the new layout's epoch ends"
        after += taken(yielded)
    return before, after, [int(i) for o in orders for i in o], rest


@pytest.mark.parametrize(("old", "new", "step"), [(4, 3, 6), (3, 5, 9), (5, 2, 1), (2, 7, 30), (3, 4, 0)])
def test_a_resize_mid_epoch_takes_each_sample_of_the_epoch_once(indexed, old, new, step):
    before, after, epoch_set, rest = resize(indexed, old, new, step)
    seen = Counter(before + after)
    assert max(seen.values()) == 1, "a sample taken twice"
    assert sorted(seen) == sorted(epoch_set), "a sample of the epoch missed (or one from outside it)"
    assert rest.batch == B
    # the next epoch is the new layout's own
    nxt = [i for index in range(new) for i in taken(Resharded(loader(indexed, index, new), rest, index).epoch(2))]
    assert sorted(nxt) == sorted(i for index in range(new) for i in loader(indexed, index, new).order(2))


def test_a_second_resize_in_the_rest_of_an_epoch_still_takes_each_sample_once(indexed):
    """4 ranks -> 3 at step 5 (a resume), then 3 -> 2 two steps into the rest (a death)."""
    before, after, epoch_set, rest = resize(indexed, 4, 3, 5)
    step = rest.first + 2
    again_before, again_after, _, rest2 = resize(indexed, 3, 2, step, old_rest=rest)
    # what the 4 ranks took, then the 3 ranks' first two steps of the rest, then the 2 ranks
    seen = Counter(before + again_before + again_after)
    assert max(seen.values()) == 1 and sorted(seen) == sorted(epoch_set)
    saved = Rest.from_state(rest2.state_dict())  # (what a checkpoint in the rest keeps)
    assert all(np.array_equal(saved.order(i, SEED), rest2.order(i, SEED)) for i in range(2))


def test_uneven_shards_resize_to_every_sample_once(indexed):
    before, after, epoch_set, _ = resize(indexed, 3, 4, 7, even=False)
    seen = Counter(before + after)
    assert len(epoch_set) == N and max(seen.values()) == 1 and sorted(seen) == list(range(N))


def test_a_pool_longer_than_the_new_epoch_takes_larger_batches_not_more_steps():
    rest = rest_of_epoch(0, np.arange(1000), 3, 20, 16)  # 334 per rank: 21 batches of 16 > 20 steps
    assert (rest.first, rest.steps, rest.batch) == (0, 20, 17)
    assert sorted(np.concatenate([rest.order(i, 0) for i in range(3)]).tolist()) == list(range(1000))
    empty = rest_of_epoch(0, np.arange(0), 3, 20, 16)  # a checkpoint at the epoch's end: nothing left
    assert (empty.first, empty.steps) == (20, 0)


def test_a_rest_resumed_at_the_same_size_goes_on_with_the_same_batches(indexed, monkeypatch):
    monkeypatch.setattr("mpi_easgd.data.rest.WINDOW", 40)  # several windows of 32 (whole batches)
    _, _, _, rest = resize(indexed, 4, 3, 2)
    for index in range(3):
        shard = Resharded(loader(indexed, index, 3), rest, index)
        whole = taken(shard.epoch(1, rest.first))
        for k in (1, 2, 3, 5):
            assert taken(shard.epoch(1, rest.first + k)) == whole[k * B:]
