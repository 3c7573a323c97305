"""The training loop shared by every algorithm, and evaluation.

An algorithm supplies a *step function* ``step(batch) -> loss tensor | None`` (``batch`` is
``None`` on a rank that has run out of data but must keep its collectives matched); the
loop feeds it this epoch's batches and counts losses and samples.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from mpi_easgd.config import Config

Batch = tuple[torch.Tensor, torch.Tensor]
StepFn = Callable[[Batch | None], torch.Tensor | None]


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    batches: int = 0
    samples: int = 0
    seconds: float = 0.0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.batches if self.batches else math.nan


def run_epoch(step: StepFn, batches: Iterator[Batch], steps: int, bar, device: torch.device, *,
              start: int = 0, stats: EpochStats | None = None,
              after_step: Callable[[int, EpochStats], None] | None = None) -> EpochStats:
    """Call ``step`` for steps ``start .. steps-1``: with this rank's batches, then with
    ``None``. ``stats`` carries a resumed epoch's totals; ``after_step(i, stats)`` runs
    after each step (checkpoints, stop requests)."""
    stats = stats or EpochStats()
    loss_sum = torch.full((), stats.loss_sum, device=device)  # summed on the device: no sync
    t0 = time.perf_counter() - stats.seconds
    try:
        for i in range(start, steps):
            batch = next(batches, None)
            if batch is not None:
                batch = (batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True))
            loss = step(batch)
            if loss is not None:
                loss_sum += loss.detach()
                stats.batches += 1
                stats.samples += len(batch[1])
            bar.update(1)
            if i % 20 == 19 and stats.batches:
                bar.set_postfix(loss=f"{loss_sum.item() / stats.batches:.4f}", refresh=False)
            if after_step is not None:
                stats.loss_sum = float(loss_sum)
                stats.seconds = time.perf_counter() - t0
                after_step(i, stats)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # stop a prefetch thread now, also when a stop or an error ends the epoch early
    stats.loss_sum = float(loss_sum)
    stats.seconds = time.perf_counter() - t0
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterator[Batch], device: torch.device) -> tuple[float, int, int]:
    """``(summed loss, correct predictions, samples)`` of ``model`` over ``batches``."""
    was_training = model.training
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        count += len(y)
    model.train(was_training)
    return loss, correct, count


def make_optimizer(cfg: Config, model: nn.Module, nesterov: bool = False) -> torch.optim.Optimizer:
    """Plain SGD with the configured momentum and weight decay (Nesterov for EAMSGD)."""
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        nesterov=nesterov and cfg.momentum > 0,
    )


class NonFiniteError(RuntimeError):
    """A NaN or Inf loss or gradient with ``--on-nonfinite stop``."""


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


def supervised_step(model: nn.Module, zero_grad: Callable[[], None]) -> Callable[[Batch], torch.Tensor]:
    """Forward and backward of one batch with cross-entropy; returns the loss."""

    def forward_backward(batch: Batch) -> torch.Tensor:
        zero_grad()
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        return loss

    return forward_backward
