"""A deliberate mismatch, for the flight recorder's test: three ranks reduce gradients with
one AllReduceSGD, then rank 1 calls a second one (on a duplicate communicator) while the
others call the first: every rank waits for the others forever; the watchdogs (3 s) write
each rank's record and end the job."""

import torch
from mpi4py import MPI

from mpi_easgd import AllReduceSGD

comm = MPI.COMM_WORLD
first = AllReduceSGD(comm, timeout=3, on_timeout="abort")
second = AllReduceSGD(comm.Dup(), timeout=3, on_timeout="abort")
models = [torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)]
for sync, model in zip((first, second), models):
    sync.synchronize_parameters(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
for _ in range(3):
    first.sum_and_normalize_gradients(models[0])
if comm.rank == 1:
    second.sum_and_normalize_gradients(models[1])  # the mismatch
else:
    first.sum_and_normalize_gradients(models[0])
