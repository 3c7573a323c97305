"""A user's torch datasets from the command line (``--dataset package.module:factory``), the
tasks (classification, next-token, regression) and the built-in text corpus, in this
process (one rank on ``MPI.COMM_SELF``; tests/mpi/spmd_runs.py trains an async run on one)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from mpi4py import MPI

from mpi_easgd.data import DataError, open_dataset, shard_loader
from mpi_easgd.tasks import TASKS
from mpi_easgd.train import _validate, run


@pytest.fixture(autouse=True)
def user_folder(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "mpi"))


def train(tmp_path, name, *flags) -> dict:
    assert run(["--algo", "sgd", "--no-progress", "--out", str(tmp_path), "--run-name", name, *flags],
               MPI.COMM_SELF) == 0
    return json.loads((tmp_path / name / "summary.json").read_text())


def test_a_regression_dataset_with_float_targets_trains_under_the_regression_task(tmp_path):
    summary = train(tmp_path, "reg", "--dataset", "user_data:regression", "--task", "regression", "--model",
                    "user_data:regression_mlp", "--epochs", "40", "--batch-size", "32", "--optimizer", "adamw",
                    "--lr", "0.003")
    info = open_dataset("user_data:regression")
    variance = float(torch.stack([info.datasets["test"][i][1] for i in range(256)]).var(unbiased=False))
    assert summary["test_loss"] < 0.35 * variance, (summary["test_loss"], variance)  # vs predicting the mean
    rows = list(csv.DictReader((tmp_path / "reg" / "metrics.csv").open()))
    assert float(rows[-1]["test_rmse"]) ** 2 == pytest.approx(float(rows[-1]["test_loss"]))
    assert summary["test_accuracy"] is None


def test_a_language_model_learns_next_tokens_below_the_unigram_baseline(tmp_path):
    summary = train(tmp_path, "lm", "--dataset", "user_data:tiny_corpus", "--task", "next-token", "--model",
                    "charlm", "--epochs", "3", "--batch-size", "16", "--optimizer", "adamw", "--lr", "0.003")
    test = open_dataset("user_data:tiny_corpus").datasets["test"]
    counts = torch.bincount(test.tokens, minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * p.log()).sum())  # nats per token of predicting the byte frequencies
    assert summary["test_loss"] < 0.6 * unigram, (summary["test_loss"], unigram)
    header = (tmp_path / "lm" / "metrics.csv").read_text().splitlines()[0]
    assert "test_perplexity" in header


@pytest.mark.parametrize("flags,message", [
    (["--dataset", "user_data:float_labels", "--model", "mlp"], "float targets, which classification cannot take"),
    (["--dataset", "user_data:not_datasets"], "its train set is a int, not a dataset"),
    (["--dataset", "user_data:broken"], r"factory\(\) failed \(OSError: the data folder is not mounted\)"),
    (["--dataset", "user_data:missing"], "user_data has no missing"),
    (["--dataset", "no_such_data:train"], "cannot import no_such_data"),
    (["--dataset", "user_data:regression", "--task", "classification"], "float targets"),
    (["--dataset", "user_data:tiny_corpus", "--task", "regression"], "integer targets; --task regression"),
    (["--dataset", "user_data:regression", "--task", "regression", "--model", "mlp"], "cannot take inputs"),
    (["--dataset", "user_data:tiny_corpus", "--task", "next-token", "--model", "user_data:regression_mlp"],
     "cannot take inputs"),
])
def test_a_dataset_that_does_not_fit_is_one_line(flags, message):
    from mpi_easgd.models import ModelError

    with pytest.raises((DataError, ModelError), match=message) as error:
        _validate(["--algo", "sgd", *flags], 0, 1)
    assert "\n" not in str(error.value)


def test_user_datasets_are_sharded_shuffled_and_resumed_like_hdf5():
    info = open_dataset("user_data:tiny_corpus")
    n = info.sizes["train"]
    seen = []
    for index in range(3):  # uneven shards: every window once
        loader = shard_loader(info, "train", index, 3, batch_size=8, seed=1, even=False, prefetch=0)
        for x, y in loader.epoch(0):
            assert x.dtype == torch.int64 and x.shape[1:] == (16,), "tokens stay integers"
            assert torch.equal(x[:, 1:], y[:, :-1]), "targets are the next tokens"
            seen += [int(v) for v in x[:, 0] * 0 + torch.arange(len(x))]
    assert len(seen) == n
    loader = shard_loader(info, "train", 1, 3, batch_size=8, seed=1, prefetch=0)
    whole = list(loader.epoch(2))
    resumed = list(loader.epoch(2, start=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole[3:], resumed)) and len(resumed) == len(whole) - 3
    assert not torch.equal(whole[0][0], list(loader.epoch(3))[0][0]), "reshuffled every epoch"
    with pytest.raises(DataError, match="--augment"):
        shard_loader(info, "train", batch_size=8, augment=True)


def test_the_builtin_text_corpus_is_the_standard_library():
    info = open_dataset("pystdlib")
    assert info.num_classes == 256 and info.shape == (64,) and info.sizes["train"] == ((1 << 20) - 1) // 64
    x, y = info.datasets["train"][0]
    assert bytes(x.tolist()).isascii() and torch.equal(x[1:], y[:-1])


def test_every_task_sums_exactly_and_says_its_metrics():
    out, y = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]]), torch.tensor([0, 1, 1])
    loss, correct, units = TASKS["classification"].sums(out, y)
    assert (correct, units) == (2, 3)
    assert TASKS["classification"].metrics(loss, correct, units)["test_accuracy"] == pytest.approx(2 / 3)
    logits, tokens = torch.zeros(2, 5, 4), torch.randint(0, 4, (2, 5))
    metrics = TASKS["next-token"].metrics(*TASKS["next-token"].sums(logits, tokens))
    assert metrics["test_perplexity"] == pytest.approx(4.0) and metrics["test_loss"] == pytest.approx(math.log(4))
    metrics = TASKS["regression"].metrics(*TASKS["regression"].sums(torch.zeros(4, 1), torch.full((4, 1), 2.0)))
    assert metrics == {"test_loss": 4.0, "test_rmse": 2.0}
    from mpi_easgd.config import Config

    assert set(dict(Config.__dataclass_fields__["task"].metadata)["choices"]) == set(TASKS)
