"""What runs a training job, whatever the algorithm: the one training loop
(:mod:`.loop`), stop signals and agreement (:mod:`.control`), the checkpoint schedule
(:mod:`.schedule`), checkpoints (:mod:`.checkpoint`), the run directory's metrics and
summary (:mod:`.metrics`), the run context (:mod:`.context`), watchdogs (:mod:`.watchdog`),
fault tolerance under ULFM (:mod:`.ft`), injected faults for tests (:mod:`.faults`) and the
settings applied before MPI starts (:mod:`.mpienv`).

May import: the foundation modules (``config``, ``topology``, ``data``, ``fileio``...);
never :mod:`mpi_easgd.collectives` or :mod:`mpi_easgd.ps`. Importing this package (or
:mod:`.ft`, :mod:`.mpienv`) costs no torch.
"""
