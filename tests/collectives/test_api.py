"""The synchronous classes' own calls in this process (one rank on ``MPI.COMM_SELF``):
evaluating the center, closing the guard, building from a configuration."""

from __future__ import annotations

import threading

import pytest
import torch
from mpi4py import MPI
from torch import nn

from mpi_easgd import AllReduceDiLoCo, AllReduceEA, AllReduceSGD, registry
from mpi_easgd.config import Config


def watchdogs() -> int:
    return sum(t.name == "mpi_easgd-watchdog" and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize("make", [lambda: AllReduceEA(MPI.COMM_SELF, tau=1, alpha=0.5),
                                  lambda: AllReduceDiLoCo(MPI.COMM_SELF, tau=1, outer_lr=0.5)],
                         ids=["ea", "diloco"])
def test_center_in_puts_the_center_in_the_model_for_the_block(make):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    with make() as algo:
        with pytest.raises(RuntimeError, match="synchronize_parameters"):
            with algo.center_in(model):
                pass
        algo.synchronize_parameters(model)
        with torch.no_grad():
            model.weight.add_(1.0)  # a local step: x moves away from the center
        algo.average_parameters(model)  # one round: the center moves, x too
        with torch.no_grad():
            model.bias.add_(1.0)  # another local step, no round yet
        x = [p.detach().clone() for p in model.parameters()]
        assert not torch.equal(algo.center, algo.flat(model).data)
        with algo.center_in(model) as held:
            assert held is model and torch.equal(algo.flat(model).data, algo.center)
        assert all(torch.equal(a, b) for a, b in zip(x, model.parameters())), "x is back after the block"


def test_close_ends_the_guards_thread_and_with_closes():
    before = watchdogs()
    sgd = AllReduceSGD(MPI.COMM_SELF, timeout=30)
    assert watchdogs() == before + 1
    sgd.close()
    sgd.close()  # idempotent
    assert watchdogs() == before
    with AllReduceEA(MPI.COMM_SELF, tau=2, alpha=0.5, timeout=30):
        assert watchdogs() == before + 1
    assert watchdogs() == before


@pytest.mark.parametrize("name", registry.SYNC_NAMES)
def test_the_registry_builds_each_sync_class_from_a_config(name):
    cfg = Config(algo=name, tau=7, outer_lr=0.3).resolve(1)
    with registry.lookup(name).load().from_config(MPI.COMM_SELF, cfg, timeout=None) as algo:
        assert type(algo).__name__ == {"sgd": "AllReduceSGD", "ea": "AllReduceEA", "diloco": "AllReduceDiLoCo"}[name]
        assert getattr(algo, "tau", 7) == 7 and getattr(algo, "outer_lr", 0.3) == 0.3
