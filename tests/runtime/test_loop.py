"""The one training loop with a recording algorithm (no MPI)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpi_easgd.config import Config
from mpi_easgd.flat import FlatParameters
from mpi_easgd.runtime.loop import Action, NonFiniteError, Position, train
from mpi_easgd.runtime.metrics import NullRunLog


class Batches:
    """``steps`` batches per epoch of a 4-feature, 3-class problem; NaN images at ``nan``."""

    def __init__(self, nan: set[int] = frozenset()) -> None:
        self.nan, self.served = nan, 0

    def epoch(self, epoch: int, start: int = 0):
        for i in range(start, 5):
            x = torch.full((2, 4), float("nan")) if (epoch, i) in self.nan else torch.randn(2, 4)
            self.served += 1
            yield x, torch.tensor([0, 2])


class Recorder:
    """An algorithm that records what the loop asks of it and answers ``actions``."""

    def __init__(self, actions: dict[tuple[int, int], Action] | None = None) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(4, 3)
        self.flat = FlatParameters(self.model)
        self.actions = actions or {}
        self.calls: list[tuple] = []

    def step(self, pos, has_grad):
        self.calls.append(("step", pos.epoch, pos.step, has_grad))

    def boundary(self, pos):
        return self.actions.get((pos.epoch, pos.step), Action.NONE)

    def save(self, pos):
        self.calls.append(("save", pos.epoch, pos.step, pos.stats.batches))

    def end_epoch(self, pos):
        self.calls.append(("end", pos.epoch, pos.stats.batches, pos.stats.samples))

    def state_dict(self, pos):
        return {}


def run(algo, pos=None, epochs=2, batches=None, **cfg):
    pos = pos or Position()
    stopped = train(algo, batches or Batches(), pos, Config(epochs=epochs, **cfg), steps=5, rank=0,
                    device=torch.device("cpu"), log=NullRunLog())
    return stopped, pos


def test_the_loop_steps_saves_and_ends_epochs_in_order():
    algo = Recorder({(0, 3): Action.SAVE})
    stopped, pos = run(algo)
    assert not stopped and (pos.epoch, pos.step, pos.t, pos.samples) == (2, 0, 10, 20)
    assert algo.calls[:5] == [("step", 0, i, True) for i in range(3)] + [("save", 0, 3, 3), ("step", 0, 3, True)]
    assert ("end", 0, 5, 10) in algo.calls and algo.calls[-1] == ("end", 1, 5, 10)


def test_stop_is_a_returned_value_after_the_checkpoint_and_resumes_mid_epoch():
    algo = Recorder({(1, 2): Action.SAVE | Action.STOP})
    stopped, pos = run(algo)
    assert stopped and algo.calls[-1] == ("save", 1, 2, 2) and (pos.epoch, pos.step, pos.t) == (1, 2, 7)
    resumed = Position.from_state(pos.state_dict())  # as a checkpoint carries it
    again = Recorder()
    stopped, end = run(again, resumed)
    assert not stopped and again.calls[0] == ("step", 1, 2, True) and end.t == 10
    assert again.calls[-1] == ("end", 1, 5, 10), "the resumed epoch counts the batches before the stop"


def test_a_nonfinite_step_is_skipped_or_stops_the_run():
    algo = Recorder()
    _, pos = run(algo, batches=Batches(nan={(0, 1)}))
    assert pos.skipped == 1 and ("step", 0, 1, False) in algo.calls  # still steps (keeps collectives matched)
    assert ("end", 0, 4, 8) in algo.calls, "the skipped batch counts in no loss"
    with pytest.raises(NonFiniteError, match="non-finite loss or gradient on rank 0"):
        run(Recorder(), batches=Batches(nan={(0, 1)}), on_nonfinite="stop")


def test_a_rank_out_of_data_steps_without_a_batch():
    class Short(Batches):
        def epoch(self, epoch, start=0):
            yield from list(super().epoch(epoch, start))[:3]

    algo = Recorder()
    _, pos = run(algo, epochs=1, batches=Short())
    assert [c[3] for c in algo.calls if c[0] == "step"] == [True] * 3 + [False] * 2 and pos.samples == 6


def test_injected_faults_apply_once_in_the_loop(monkeypatch):
    from mpi_easgd.runtime.faults import InjectedFault

    monkeypatch.setenv("MPI_EASGD_FAULT", "rank=0,action=raise,step=7")
    algo = Recorder()
    with pytest.raises(InjectedFault):
        run(algo)
    assert sum(c[0] == "step" for c in algo.calls) == 7


def test_positions_from_older_or_partial_states():
    rejoin = Position.from_state({"epoch": 2, "exchanges": 9})  # a worker lost in the saved run
    assert (rejoin.epoch, rejoin.step, rejoin.t) == (2, 0, 0)




def test_micro_batches_add_up_to_the_whole_batchs_gradient():
    """A batch of 10 through micro-batches of 4, 4 and 2 (--keep-global-batch): the same
    loss and gradient as the whole batch at once, within rounding."""
    from mpi_easgd.runtime.loop import supervised_step

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    batch = (torch.randn(10, 6), torch.randint(0, 3, (10,)))

    def gradient(micro):
        loss = supervised_step(model, lambda: model.zero_grad(set_to_none=True), micro=micro)(batch)
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    (whole, g), (parts, h) = gradient(None), gradient(4)
    assert torch.allclose(whole, parts, atol=1e-6) and torch.allclose(g, h, atol=1e-6)
    assert not torch.equal(g, gradient(None)[1] * 0)  # (a gradient at all)
