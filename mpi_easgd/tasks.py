"""What a model is trained to do: its loss, and the metrics it is evaluated by (``--task``).

- ``classification`` (the default): cross-entropy over classes; ``test_loss`` and
  ``test_accuracy``. Targets are class indices.
- ``next-token``: a language model's outputs ``[batch, time, vocabulary]`` against the next
  token at every position; ``test_loss`` (per token), ``test_perplexity``,
  ``test_accuracy`` (per token).
- ``regression``: mean squared error against float targets; ``test_loss`` (the MSE) and
  ``test_rmse``.

A task turns a batch into summable quantities (:meth:`Task.sums`: loss summed over the
batch's units, correct predictions, units) so that ranks and batches add up exactly, then
into metrics (:meth:`Task.metrics`).
"""

from __future__ import annotations

import abc
import math

import torch
from torch import nn


class Task(abc.ABC):
    """The loss and metrics of one kind of training (see the module docstring)."""

    name = ""
    unit = "sample"  # what the loss averages over

    @abc.abstractmethod
    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss: the mean over the batch's units."""

    @abc.abstractmethod
    def sums(self, output: torch.Tensor, target: torch.Tensor) -> tuple[float, float, float]:
        """``(summed loss, correct predictions, units)`` of one batch."""

    def metrics(self, loss_sum: float, correct: float, units: float) -> dict[str, float]:
        """The evaluation's metrics from sums over every batch (and rank)."""
        loss = loss_sum / units if units else math.nan
        return {"test_loss": loss, "test_accuracy": correct / units if units else math.nan}

    @abc.abstractmethod
    def expected_output(self, target_shape: tuple[int, ...], num_classes: int) -> tuple[int, ...]:
        """The shape of the model's output for one sample whose target has ``target_shape``."""

    def check_data(self, info) -> None:
        """Raise ``DataError`` (one line) when the dataset's targets do not suit this task."""
        from mpi_easgd.data.layout import DataError

        integer = info.target_dtype is None or not info.target_dtype.is_floating_point  # (HDF5: class indices)
        if self.integer_targets and not integer:
            raise DataError(f"{info.name} has float targets, which {self.name} cannot take (they are not class "
                            f"indices); use --task regression")
        if not self.integer_targets and integer:
            raise DataError(f"{info.name} has integer targets; --task {self.name} needs float targets (use "
                            f"--task classification or next-token)")
        if self.integer_targets and info.num_classes < 1:
            raise DataError(f"{info.name} does not say how many classes its targets have: give its train set a "
                            f"num_classes attribute (a language model: the vocabulary size)")

    integer_targets = True


class Classification(Task):
    name = "classification"

    def loss(self, output, target):
        return nn.functional.cross_entropy(output, target)

    def sums(self, output, target):
        loss = float(nn.functional.cross_entropy(output, target, reduction="sum"))
        return loss, float((output.argmax(1) == target).sum()), float(len(target))

    def expected_output(self, target_shape, num_classes):
        return (num_classes,)


class NextToken(Task):
    name = "next-token"
    unit = "token"

    def loss(self, output, target):
        return nn.functional.cross_entropy(output.flatten(0, -2), target.flatten())

    def sums(self, output, target):
        logits, target = output.flatten(0, -2), target.flatten()
        loss = float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        return loss, float((logits.argmax(1) == target).sum()), float(target.numel())

    def metrics(self, loss_sum, correct, units):
        out = super().metrics(loss_sum, correct, units)
        out["test_perplexity"] = math.exp(min(out["test_loss"], 700.0))
        return out

    def expected_output(self, target_shape, num_classes):
        return (*target_shape, num_classes)


class Regression(Task):
    name = "regression"
    unit = "target value"
    integer_targets = False

    def loss(self, output, target):
        return nn.functional.mse_loss(output, target.to(output.dtype).view_as(output))

    def sums(self, output, target):
        target = target.to(output.dtype).view_as(output)
        return float(nn.functional.mse_loss(output, target, reduction="sum")), 0.0, float(target.numel())

    def metrics(self, loss_sum, correct, units):
        mse = loss_sum / units if units else math.nan
        return {"test_loss": mse, "test_rmse": math.sqrt(mse) if units else math.nan}

    def expected_output(self, target_shape, num_classes):
        return tuple(target_shape) or (1,)


TASKS: dict[str, Task] = {t.name: t for t in (Classification(), NextToken(), Regression())}


def task(name: str) -> Task:
    """The task called ``name`` (one of :data:`TASKS`)."""
    return TASKS[name]
