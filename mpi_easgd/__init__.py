"""mpi_easgd: data-parallel and elastic-averaging training for PyTorch on MPI.

Public API::

    from mpi_easgd import AllReduceSGD, AllReduceEA, AllReduceDiLoCo, AsyncTraining, FlatParameters
    from mpi_easgd import HierarchicalAveraging

``AllReduceSGD(comm)`` averages gradients with one ``Allreduce`` per step;
``AllReduceEA(comm, tau, alpha)`` runs synchronous elastic averaging;
``AllReduceDiLoCo(comm, tau, outer_lr, outer_momentum)`` runs DiLoCo (an outer Nesterov
step on the averaged pseudo-gradient every ``tau`` local steps; ``fragments`` and
``overlap_steps`` for streaming DiLoCo); both take ``exchange_dtype="float16"`` or
``"bfloat16"`` to halve the bytes of each round, or ``"int8"``, ``"int4"``, ``"topk"``
(:mod:`mpi_easgd.compress`, with error feedback) to send 1/4, 1/8 or 1/85 of them.
``HierarchicalAveraging(comm, {4: "node", 16: comm.size})`` averages the parameters at
several levels with their own periods (torch's ``HierarchicalModelAverager`` on MPI).
``AsyncTraining(comm, model, optimizer, algo="easgd", ...)`` runs the asynchronous family
(EASGD, EAMSGD, DOWNPOUR, async DiLoCo, or a rule of your own) around your own loop, with
a parameter-server rank and a tester rank; the command line
(``mpirun -np 4 python -m mpi_easgd.train --algo easgd``) is one user of it.

The package re-creates two Lua/Torch projects, called "the seed" in its docs: DistLearn
(``AllReduceSGD``, ``AllReduceEA``, whose calls these classes keep in snake case) and
Async-EASGD (the parameter server with its workers and tester). The layers: ``rules``
(pure update rules), ``runtime`` (the training loop, checkpoints, signals, fault
tolerance), ``collectives`` (the synchronous classes), ``ps`` (the parameter-server
engine); ``registry`` describes every algorithm once.
"""

import importlib

from mpi_easgd.runtime import mpienv

mpienv.prepare()  # must run before mpi4py initialises MPI

__all__ = ["AllReduceDiLoCo", "AllReduceEA", "AllReduceSGD", "AsyncTraining", "FlatParameters",
           "HierarchicalAveraging"]
__version__ = "0.1.0"
_HOMES = {"AllReduceDiLoCo": "mpi_easgd.collectives.allreduce_diloco",
          "AllReduceEA": "mpi_easgd.collectives.allreduce_ea",
          "AllReduceSGD": "mpi_easgd.collectives.allreduce_sgd", "AsyncTraining": "mpi_easgd.ps.api",
          "FlatParameters": "mpi_easgd.flat", "HierarchicalAveraging": "mpi_easgd.collectives.hierarchical"}


def __getattr__(name: str):
    """The public classes, imported on first use: ``import mpi_easgd`` (which every entry
    point does first) stays free of torch, so a process starts MPI in a fraction of a
    second (a replacement worker's launch waits on exactly that)."""
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'mpi_easgd' has no attribute {name!r}")
