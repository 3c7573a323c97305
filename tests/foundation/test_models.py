"""The model registry: every built-in model builds and runs; unknown names are one line."""

from __future__ import annotations

import json

import pytest
import torch

from mpi_easgd.models import ModelError, build_model, check_model_name


@pytest.mark.parametrize("name,shape,params", [
    ("lenet", (1, 28, 28), 61_706),
    ("cifarnet", (3, 32, 32), 4_328_970),
    ("resnet20", (3, 32, 32), 272_474),
    ("convmlp", (3, 32, 32), 9_449_194),
])
def test_models_build_and_run(name, shape, params):
    model = build_model(name, shape, 10)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


def test_unknown_model():
    with pytest.raises(ModelError, match="unknown model 'vgg'"):
        check_model_name("vgg")


def test_torchvision_models_load_or_fail_clearly():
    try:
        model = build_model("torchvision:resnet18", (3, 32, 32), 10)
    except ModelError as exc:
        assert "torchvision" in str(exc)
    else:
        assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ModelError):
        build_model("torchvision:no_such_model", (3, 32, 32), 10)


FACTORIES = """
import torch
from torch import nn

def tiny(shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(shape[0] * shape[1] * shape[2], num_classes))

class Tiny(nn.Module):  # a class works as well
    def __init__(self, shape, num_classes):
        super().__init__()
        self.head = nn.Linear(shape[0] * shape[1] * shape[2], num_classes)

    def forward(self, x):
        return self.head(x.flatten(1))

def wrong_size(shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(7, num_classes))

def not_a_model(shape, num_classes):
    return "a model"

def one_argument(shape):
    return tiny(shape, 2)

NOT_CALLABLE = 3
"""


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_users_model_factory_trains_from_the_command_line(user_models, blobs, capsys):
    from mpi4py import MPI

    from mpi_easgd.train import run

    for name in ("user_models:tiny", "user_models:Tiny"):
        assert run(["--algo", "sgd", "--model", name, "--dataset", str(blobs), "--epochs", "2", "--no-progress",
                    "--out", str(user_models), "--run-name", name.replace(":", "-")], MPI.COMM_SELF) == 0
        summary = json.loads((user_models / name.replace(":", "-") / "summary.json").read_text())
        assert summary["model"] == name and summary["test_accuracy"] > 0.5, summary


@pytest.mark.parametrize("name,message", [
    ("no_such_module:tiny", "cannot import no_such_module"),
    ("user_models:missing", "user_models has no missing"),
    ("user_models:NOT_CALLABLE", "is not callable"),
    ("user_models:not_a_model", "returned str, not a torch.nn.Module"),
    ("user_models:one_argument", r"factory\(shape=\(1, 8, 8\), num_classes=4\) failed \(TypeError"),
    ("user_models:wrong_size", "cannot take images of shape"),
])
def test_a_bad_model_factory_is_one_line(user_models, blobs, name, message):
    from mpi_easgd.train import _validate

    with pytest.raises(ModelError, match=message) as error:
        _validate(["--algo", "sgd", "--model", name, "--dataset", str(blobs)], 0, 1)
    assert "\n" not in str(error.value)
