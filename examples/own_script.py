"""Use AllReduceSGD or AllReduceEA inside your own training loop.

    mpiexec -n 4 python -m mpi4py examples/own_script.py          # AllReduceSGD
    mpiexec -n 4 python -m mpi4py examples/own_script.py --ea     # AllReduceEA
    mpiexec -n 4 python -m mpi4py examples/own_script.py --uneven # ranks take different numbers of steps

With ``--uneven`` rank r uses only the first (r + 1) / ranks of its batches, as when the
ranks' data differ in size: the loop stays the same, because ``synchronize_parameters`` and
``synchronize_center`` let every rank finish the epoch.
"""

import contextlib
import itertools
import sys

import torch
from mpi4py import MPI
from torch import nn

from mpi_easgd import AllReduceEA, AllReduceSGD
from mpi_easgd.data import ShardLoader, read_info, resolve_dataset

comm = MPI.COMM_WORLD
torch.set_num_threads(1)
info = read_info(resolve_dataset("mnist5k"))
train = ShardLoader(info, "train", comm.rank, comm.size, batch_size=32, seed=0)
test = ShardLoader(info, "test", batch_size=1000, shuffle=False)
my_steps = train.steps * (comm.rank + 1) // comm.size if "--uneven" in sys.argv else train.steps

model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
use_ea = "--ea" in sys.argv
algo = AllReduceEA(comm, tau=10, alpha=0.9 / comm.size) if use_ea else AllReduceSGD(comm)
algo.synchronize_parameters(model)  # every rank starts from rank 0's parameters

for epoch in range(5):
    for x, y in itertools.islice(train.epoch(epoch), my_steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if use_ea:
            optimizer.step()
            algo.average_parameters(model)  # elastic round every tau steps
        else:
            algo.sum_and_normalize_gradients(model)  # one Allreduce
            optimizer.step()
    # Finishes the epoch (a rank that is done joins the others' rounds until all are done), then
    # gives every rank the same parameters (SGD) or the same center (EA).
    if use_ea:
        algo.synchronize_center(model)
    else:
        algo.synchronize_parameters(model)
    x, y = next(test.epoch(0))
    # AllReduceEA's result is its center: center_in puts it in the model for the block (to
    # evaluate it, or save it with torch.save(model.state_dict(), ...)), then puts x back.
    with algo.center_in(model) if use_ea else contextlib.nullcontext(), torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    if comm.rank == 0:
        print(f"epoch {epoch + 1}: test accuracy {accuracy:.3f}", flush=True)
algo.close()  # ends the watchdog thread that guards its collectives
