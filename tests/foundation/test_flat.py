"""Flat parameters and gradients in one buffer, and what MPI is handed for a tensor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpi_easgd.flat import FlatParameters
from mpi_easgd.transfer import MPIBuffer


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def test_flat_parameters_are_views_and_training_is_unchanged():
    ref, model = small_model(), small_model()
    flat = FlatParameters(model)
    assert flat.numel == sum(p.numel() for p in ref.parameters())
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        for m, o in ((ref, opt_ref), (model, opt)):
            o.zero_grad()  # set_to_none: the flat module must cope via gather_grads
            nn.functional.cross_entropy(m(x), y).backward()
        flat.gather_grads()
        opt_ref.step()
        opt.step()
    for p, q in zip(ref.parameters(), model.parameters()):
        assert torch.equal(p, q)
    offset = 0
    for p in model.parameters():
        assert p.data_ptr() == flat.data[offset:].data_ptr()
        assert p.grad.data_ptr() == flat.grad[offset:].data_ptr()
        offset += p.numel()
    flat.check_views()


def test_backward_accumulates_into_the_flat_gradient_in_place():
    model = small_model()
    flat = FlatParameters(model, grad_extra=1)
    flat.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(4, 5)), torch.tensor([0, 1, 2, 0])).backward()
    assert flat.grad.abs().sum() > 0
    assert all(p.grad.data_ptr() >= flat.grad_buffer.data_ptr() for p in model.parameters())
    assert flat.grad_buffer.numel() == flat.numel + 1


def test_moving_the_model_after_flattening_is_detected():
    model = small_model()
    flat = FlatParameters(model)
    model[0].weight.data = model[0].weight.data.clone()
    with pytest.raises(RuntimeError, match="no longer lives in the flat buffer"):
        flat.check_views()


def test_mpi_buffer_refuses_non_contiguous():
    with pytest.raises(ValueError, match="contiguous"):
        MPIBuffer(torch.zeros(3, 4).t())
    t = torch.arange(4.0)
    buf = MPIBuffer(t)
    buf.mpi[0] = 7
    assert t[0] == 7  # a zero-copy view on CPU
