"""Datasets and models defined only in a test file, as a user would write them: a
regression on float targets, and a tiny next-token corpus (``--dataset user_data:...``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset


def regression():
    """y = sin(3 x1) + x2 x3 + noise on x in [-1, 1]^8: float targets of shape (1,)."""
    def split(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(n, 8, generator=g) * 2 - 1
        y = torch.sin(3 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.05 * torch.randn(n, generator=g)
        return TensorDataset(x, y.unsqueeze(1))

    return split(1024, 1), split(256, 2)


def regression_mlp(shape, outputs):
    return nn.Sequential(nn.Linear(shape[0], 64), nn.Tanh(), nn.Linear(64, outputs))


class Text(Dataset):
    """Next-token windows of 16 bytes over a small corpus with structure to learn."""

    num_classes = 256

    def __init__(self, text: bytes) -> None:
        self.tokens = torch.tensor(list(text), dtype=torch.long)

    def __len__(self):
        return (len(self.tokens) - 1) // 16

    def __getitem__(self, i):
        return self.tokens[i * 16:i * 16 + 16], self.tokens[i * 16 + 1:i * 16 + 17]


def tiny_corpus():
    words = [b"alpha ", b"beta ", b"gamma ", b"delta "]
    g = torch.Generator().manual_seed(0)
    text = b"".join(words[int(i)] for i in torch.randint(0, 4, (3000,), generator=g))
    return Text(text[:12000]), Text(text[12000:15000])


def float_labels():
    """Float targets, as a classification dataset would wrongly give them."""
    x = torch.rand(64, 4)
    return TensorDataset(x, torch.rand(64)), TensorDataset(x, torch.rand(64))


def not_datasets():
    return 3, 4


def broken():
    raise OSError("the data folder is not mounted")


TAKEN: list[int] = []  # the training items this process took (counted_regression)


class Counted(Dataset):
    """A dataset that says which items a run trained on: every item read while autograd
    is on (the training loop; evaluation reads under no_grad) is appended to ``TAKEN``,
    which ``counting_mlp`` empties when the run builds its model (the set-up's reads of an
    item, to learn its shape, come before)."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if torch.is_grad_enabled():
            TAKEN.append(int(i))
        return self.data[i]


def counted_regression():
    train, test = regression()
    return Counted(train), test


def counting_mlp(shape, outputs):
    TAKEN.clear()
    return regression_mlp(shape, outputs)
