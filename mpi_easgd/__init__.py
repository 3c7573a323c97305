"""mpi_easgd: data-parallel and elastic-averaging training for PyTorch on MPI.

Public API::

    from mpi_easgd import AllReduceSGD, AllReduceEA, AllReduceDiLoCo, FlatParameters

``AllReduceSGD(comm)`` averages gradients with one ``Allreduce`` per step;
``AllReduceEA(comm, tau, alpha)`` runs synchronous elastic averaging;
``AllReduceDiLoCo(comm, tau, outer_lr, outer_momentum)`` runs DiLoCo (an outer Nesterov
step on the averaged pseudo-gradient every ``tau`` local steps); both take
``exchange_dtype="float16"`` or ``"bfloat16"`` to halve the bytes of each round. The
asynchronous family (EASGD, EAMSGD, DOWNPOUR and async DiLoCo, with a parameter-server rank)
runs from the command line: ``mpirun -np 4 python -m mpi_easgd.train --algo easgd``.
"""

from mpi_easgd import _mpienv

_mpienv.prepare()  # must run before mpi4py initialises MPI

from mpi_easgd.algorithms.allreduce_diloco import AllReduceDiLoCo  # noqa: E402
from mpi_easgd.algorithms.allreduce_ea import AllReduceEA  # noqa: E402
from mpi_easgd.algorithms.allreduce_sgd import AllReduceSGD  # noqa: E402
from mpi_easgd.flat import FlatParameters  # noqa: E402

__all__ = ["AllReduceDiLoCo", "AllReduceEA", "AllReduceSGD", "FlatParameters"]
__version__ = "0.1.0"
