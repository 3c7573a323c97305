"""Pieces shared by the synchronous algorithms: flattening once and broadcasting."""

from __future__ import annotations

import weakref

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpi_easgd.flat import FlatParameters, MPIBuffer


class FlatCache:
    """The :class:`FlatParameters` of the model an algorithm works on, built on first use.

    An algorithm object serves one model; a second model is refused rather than silently
    mixing buffers.
    """

    def __init__(self, *, grad_extra: int = 0, transfer: str = "auto") -> None:
        self._grad_extra = grad_extra
        self.transfer = transfer
        self._model: weakref.ref | None = None
        self.flat: FlatParameters | None = None

    def get(self, model: nn.Module) -> FlatParameters:
        if self.flat is not None and self._model is not None and self._model() is model:
            return self.flat
        if self.flat is not None:
            raise ValueError("this algorithm object already serves another model; make one per model")
        self.flat = FlatParameters(model, grad_extra=self._grad_extra)
        self._model = weakref.ref(model)
        self.data = MPIBuffer(self.flat.data, self.transfer)
        self.grad = MPIBuffer(self.flat.grad_buffer, self.transfer)
        return self.flat


def bcast_tensor(comm: MPI.Comm, tensor: torch.Tensor, root: int, transfer: str = "auto") -> None:
    """Broadcast one contiguous tensor from ``root`` in place (any dtype, any device)."""
    buf = MPIBuffer(tensor, transfer)
    buf.before_send()
    comm.Bcast(buf.mpi, root=root)
    buf.after_recv()


def bcast_module_state(
    comm: MPI.Comm, model: nn.Module, data: MPIBuffer, root: int
) -> None:
    """Broadcast the flat parameters and every buffer (e.g. BatchNorm statistics) from root."""
    data.before_send()
    comm.Bcast(data.mpi, root=root)
    data.after_recv()
    for b in model.buffers():
        if b.is_contiguous() and b.numel():
            bcast_tensor(comm, b, root)


def argmax_rank(comm: MPI.Comm, value: int) -> int:
    """The rank with the largest ``value``; ties go to the lowest rank."""
    values = np.asarray(comm.allgather(int(value)))
    return int(np.argmax(values))
