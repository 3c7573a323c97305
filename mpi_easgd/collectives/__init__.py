"""The synchronous library: every rank trains, and the ranks meet in collectives.

``AllReduceSGD`` (one gradient Allreduce per step, optionally overlapped with backward:
:mod:`.overlap`), ``AllReduceEA`` (synchronous elastic averaging) and ``AllReduceDiLoCo``
(an outer Nesterov step every ``tau`` local steps) have the calls of DistLearn (the
Lua/Torch library this package re-creates, "the seed" in these docs) in snake case
(``synchronize_parameters``, ``sum_and_normalize_gradients``, ``average_parameters``,
``synchronize_center``), each a small class on one contiguous buffer;
``HierarchicalAveraging`` (:mod:`.hierarchical`) averages parameters in groups at several
periods (torch's ``HierarchicalModelAverager``). :mod:`.base` holds
what they share; :mod:`.peer` is the command line's synchronous role, one user of them.

May import: the foundation modules (``config``, ``flat``, ``transfer``, ``data``,
``models``...), :mod:`mpi_easgd.rules` and :mod:`mpi_easgd.runtime`; never
:mod:`mpi_easgd.ps`.
"""
