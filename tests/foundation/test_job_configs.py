"""Every shipped job config loads, validates and names a known model and algorithm."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpi_easgd.config import Config
from mpi_easgd.models import check_model_name
from mpi_easgd.registry import NAMES as ALGOS

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "jobs" / "configs").glob("*.toml"))


def test_there_is_a_config_per_dataset_model_and_algorithm():
    names = {p.stem for p in CONFIGS}
    for prefix in ("mnist", "cifar10", "cifar10_resnet20"):
        assert {f"{prefix}_{a}" for a in ALGOS} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_is_valid(path):
    cfg = Config.from_toml(path)
    cfg.validate()
    check_model_name(cfg.model)
    assert path.stem.endswith(cfg.algo)
    resolved = cfg.resolve(workers=2)
    assert resolved.lr > 0 and 0 <= resolved.momentum < 1
