"""The one training loop, shared by every role that trains, and evaluation.

:func:`train` reads top to bottom: for each epoch, for each step, the batch goes through
forward and backward, a non-finite loss or gradient is handled (skipped or an error), the
algorithm communicates and updates (:meth:`Algorithm.step`), and at the step boundary the
algorithm answers with an :class:`Action` (save, stop, both or neither). An algorithm is
any object with the five methods of :class:`Algorithm`: ``collectives.peer.Peer`` adapts
the synchronous classes (``AllReduceSGD``, ``AllReduceEA``, ``AllReduceDiLoCo``: the
calls of DistLearn, the Lua/Torch library this package re-creates),
``ps.worker.AsyncWorker`` talks to the parameter server (EASGD, EAMSGD, DOWNPOUR, async
DiLoCo). Injected faults (``$MPI_EASGD_FAULT``) apply here, once, for every role.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import torch
from torch import nn

from mpi_easgd.config import Config
from mpi_easgd.runtime import faults
from mpi_easgd.tasks import TASKS, Task, task

Batch = tuple[torch.Tensor, torch.Tensor]
CLASSIFICATION = TASKS["classification"]


class Action(enum.Flag):
    """What an algorithm wants at a step boundary."""

    NONE = 0
    SAVE = enum.auto()  # write a checkpoint now
    STOP = enum.auto()  # leave the loop (after the checkpoint, if SAVE too)


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    batches: int = 0
    samples: int = 0
    seconds: float = 0.0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.batches if self.batches else math.nan


@dataclass
class Position:
    """Where a rank is in its run, and its totals over every segment of a resumed run."""

    epoch: int = 0
    step: int = 0  # the next step within the epoch
    t: int = 0  # local steps taken
    samples: int = 0  # local samples trained on
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    seconds: float = 0.0  # async worker: training time before this segment (it keeps the clock)
    computing: int = 0  # samples of the step in progress, between backward and its exchange (lost if it fails)
    stats: EpochStats = field(default_factory=EpochStats)  # the current epoch's so far

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> Position:
        """From :meth:`state_dict`; keys it lacks keep their defaults (an async worker lost
        in the saved run has only ``epoch`` and ``exchanges``, extra keys are ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in state.items() if k in known}
        if isinstance(values.get("stats"), dict):
            values["stats"] = EpochStats(**values["stats"])
        return cls(**values)


class Algorithm(Protocol):
    """What :func:`train` needs from an algorithm (the set-up is its constructor)."""

    model: nn.Module
    flat: Any  # FlatParameters: ``grad`` is checked for non-finite values, ``zero_grad``

    def step(self, pos: Position, has_grad: bool) -> None:
        """After backward: communicate, and take the optimizer step if ``has_grad``."""

    def boundary(self, pos: Position) -> Action:
        """After step ``pos.step - 1``: save, stop, both or neither."""

    def save(self, pos: Position) -> None:
        """Write this rank's part of a checkpoint at ``pos``."""

    def end_epoch(self, pos: Position) -> None:
        """After the last step of epoch ``pos.epoch`` (synchronize, evaluate, log)."""

    def state_dict(self, pos: Position) -> dict:
        """This rank's checkpoint state at ``pos``."""


class NonFiniteError(RuntimeError):
    """A NaN or Inf loss or gradient with ``--on-nonfinite stop``."""


def train(algo: Algorithm, loader, pos: Position, cfg: Config, *, steps: int, rank: int,
          device: torch.device, log) -> bool:
    """Train from ``pos`` to the end of epoch ``cfg.epochs`` (``steps`` per epoch; a rank
    out of data steps with no batch), or until the algorithm says stop: returns whether it
    did. ``pos`` is updated as it goes."""
    forward_backward = supervised_step(algo.model, algo.flat.zero_grad, task(cfg.task), micro=cfg.batch_size)
    fault = faults.from_env(rank)
    local = 0  # steps taken by this process: what injected faults count
    for epoch in range(pos.epoch, cfg.epochs):
        pos.epoch = epoch
        bar = log.progress(steps, f"epoch {epoch + 1}/{cfg.epochs}")
        bar.update(pos.step)
        batches = loader.epoch(epoch, pos.step)
        loss_sum = torch.full((), pos.stats.loss_sum, device=device)  # summed on the device: no sync
        epoch_start = time.perf_counter() - pos.stats.seconds
        try:
            while pos.step < steps:
                batch = next(batches, None)
                if fault:
                    batch = fault.before_step(local, batch)
                local += 1
                loss = None
                if batch is not None:
                    batch = (batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True))
                    loss = forward_backward(batch)
                    pos.computing = len(batch[1])
                    if not finite(loss, algo.flat.grad):
                        if cfg.on_nonfinite == "stop":
                            raise NonFiniteError(f"non-finite loss or gradient on rank {rank}; lower --lr or "
                                                 f"run with --on-nonfinite skip")
                        pos.skipped, loss = pos.skipped + 1, None  # no NaN reaches another rank
                algo.step(pos, loss is not None)
                pos.step, pos.t, pos.computing = pos.step + 1, pos.t + 1, 0
                if batch is not None:
                    pos.samples += len(batch[1])
                if loss is not None:
                    loss_sum += loss.detach()
                    pos.stats.batches += 1
                    pos.stats.samples += len(batch[1])
                bar.update(1)
                if pos.step % 20 == 0 and pos.stats.batches:
                    bar.set_postfix(loss=f"{loss_sum.item() / pos.stats.batches:.4f}", refresh=False)
                action = algo.boundary(pos)
                if action:
                    pos.stats.loss_sum, pos.stats.seconds = float(loss_sum), time.perf_counter() - epoch_start
                if Action.SAVE in action:
                    algo.save(pos)
                if Action.STOP in action:
                    return True
        finally:  # (also when a collective failed: --on-rank-loss shrink goes on from pos)
            pos.stats.loss_sum, pos.stats.seconds = float(loss_sum), time.perf_counter() - epoch_start
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # stop a prefetch thread now, also when a stop or an error ends the epoch early
            bar.close()
        pos.stats.loss_sum, pos.stats.seconds = float(loss_sum), time.perf_counter() - epoch_start
        algo.end_epoch(pos)
        pos.epoch, pos.step, pos.stats = epoch + 1, 0, EpochStats()
    return False


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterator[Batch], device: torch.device,
             kind: Task = CLASSIFICATION) -> tuple[float, float, float]:
    """``(summed loss, correct predictions, units)`` of ``model`` over ``batches`` for the
    task ``kind`` (units: samples, or tokens for a language model)."""
    was_training = model.training
    model.eval()
    loss, correct, count = 0.0, 0.0, 0.0
    for x, y in batches:
        sums = kind.sums(model(x.to(device)), y.to(device))
        loss, correct, count = loss + sums[0], correct + sums[1], count + sums[2]
    model.train(was_training)
    return loss, correct, count


def make_optimizer(cfg: Config, model: nn.Module, nesterov: bool = False) -> torch.optim.Optimizer:
    """The local optimizer: plain SGD with the configured momentum and weight decay
    (Nesterov for EAMSGD), or AdamW (``--optimizer adamw``, decoupled weight decay)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        nesterov=nesterov and cfg.momentum > 0,
    )


def finite(loss: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether the loss and every gradient entry are finite (one pass, no large allocation:
    a NaN or Inf anywhere makes the sum non-finite)."""
    return bool(torch.isfinite(loss) & torch.isfinite(grad.sum()))


def nonfinite_note(skipped: int, steps: int) -> str | None:
    """What to tell the user when ``skipped`` of ``steps`` training steps had a NaN/Inf
    loss or gradient (None when none had)."""
    if not skipped:
        return None
    what = f"{skipped} of {steps} training steps were skipped for a non-finite loss or gradient"
    if skipped >= steps / 2:
        return (f"the run diverged: {what}, so its results mean nothing; lower --lr, or check the data with "
                f"python -m mpi_easgd.data verify")
    return f"{what} (--on-nonfinite skip)"


def supervised_step(model: nn.Module, zero_grad: Callable[[], None], kind: Task = CLASSIFICATION,
                    micro: int | None = None) -> Callable[[Batch], torch.Tensor]:
    """Forward and backward of one batch with the task's loss; returns the loss. A batch
    larger than ``micro`` samples goes through in micro-batches of at most ``micro``, each
    loss weighted by its share of the batch: the gradients add up to the whole batch's
    (within rounding), in the memory of one micro-batch (``--keep-global-batch``)."""

    def forward_backward(batch: Batch) -> torch.Tensor:
        zero_grad()
        n = len(batch[1])
        if micro is None or n <= micro:
            loss = kind.loss(model(batch[0]), batch[1])
            loss.backward()
            return loss
        total = torch.zeros((), device=batch[1].device)
        for a in range(0, n, micro):
            x, y = batch[0][a:a + micro], batch[1][a:a + micro]
            loss = kind.loss(model(x), y) * (len(y) / n)
            loss.backward()
            total += loss.detach()
        return total

    return forward_backward
