"""The parameter-server engine of the asynchronous family (EASGD, EAMSGD, DOWNPOUR, async
DiLoCo): rank 0 the server holding the center, a dedicated tester rank, and workers that
exchange with the server on their own clocks with nonblocking point-to-point messages.

- :mod:`.roles`: each rank's role in one run (server, worker, tester), set up and ended;
- :mod:`.server`: the server's dispatch loop and checkpoint orchestration;
- :mod:`.roster`: what the server knows of each worker, one record per worker, and the
  worker-loss policies (abort, continue, respawn);
- :mod:`.worker`: a worker as the training loop sees it;
- :mod:`.protocol`: the wire format (tags, commands, control messages) and the worker's
  end of it; :mod:`.endpoints`: the server's posted receives as typed events;
- :mod:`.center`: the center as immutable versions; :mod:`.barrier`: the checkpoint
  barrier; :mod:`.liveness`: heartbeats and silent workers; :mod:`.tester_feed` and
  :mod:`.tester`: snapshots and their evaluation; :mod:`.spares` and :mod:`.join`:
  replacement workers (ULFM).

May import: the foundation modules, :mod:`mpi_easgd.rules` and :mod:`mpi_easgd.runtime`;
never :mod:`mpi_easgd.collectives`. Importing this package costs no torch (a spare worker
starts MPI at once, see :mod:`.join`).
"""
