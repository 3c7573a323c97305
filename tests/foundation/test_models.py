"""The model registry: every built-in model builds and runs; unknown names are one line."""

from __future__ import annotations

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
