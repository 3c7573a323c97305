"""Who does what: each rank's role, computed once from (world size, rank, algorithm).

Synchronous algorithms (sgd, ea, diloco; :mod:`mpi_easgd.registry` says which): every rank
is a ``peer``. Asynchronous ones (easgd, eamsgd, downpour, async-diloco): rank 0 is the
``server`` (it owns the center, or with ``--servers S`` its first shard, and coordinates
the run: liveness, checkpoints, the tester), ranks 1..S-1 are ``shard`` servers (one
contiguous shard of the center each), the last rank is the ``tester``, ranks S..n-2 are
``worker`` s, sharded by worker index (rank - S).
:meth:`Topology.build` is pure and validates before any MPI traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpi_easgd import registry
from mpi_easgd.config import ConfigError

SERVER_RANK = 0


@dataclass(frozen=True)
class Topology:
    """The parallel layout of one job (identical on every rank except ``rank``/``role``)."""

    world_size: int
    rank: int
    algo: str
    role: str  # "peer" | "server" | "shard" | "worker" | "tester"
    servers: int = 1  # server ranks (async)

    @classmethod
    def build(cls, world_size: int, rank: int, algo: str, servers: int = 1) -> Topology:
        try:
            is_async = registry.lookup(algo).is_async
        except registry.AlgorithmError as exc:
            raise ConfigError(str(exc)) from None
        if is_async:
            if world_size < servers + 2:
                what = "server" if servers == 1 else f"{servers} servers"
                raise ConfigError(
                    f"async {algo} needs at least {servers + 2} ranks ({what}, tester, 1+ worker); got "
                    f"{world_size}: run mpirun -np {servers + 3} ..., "
                    + ("or use --algo sgd/ea with fewer ranks" if servers == 1 else "or lower --servers")
                )
            if rank == SERVER_RANK:
                role = "server"
            elif rank < servers:
                role = "shard"
            elif rank == world_size - 1:
                role = "tester"
            else:
                role = "worker"
        else:
            role = "peer"
        return cls(world_size=world_size, rank=rank, algo=algo, role=role, servers=servers if is_async else 1)

    @property
    def is_async(self) -> bool:
        return registry.lookup(self.algo).is_async

    @property
    def server_rank(self) -> int:
        return SERVER_RANK

    @property
    def server_ranks(self) -> list[int]:
        """Every server rank, the one that coordinates first (its shard is the first)."""
        return list(range(self.servers))

    @property
    def tester_rank(self) -> int:
        return self.world_size - 1 if self.is_async else 0

    @property
    def worker_ranks(self) -> list[int]:
        return list(range(self.servers, self.world_size - 1)) if self.is_async else list(range(self.world_size))

    @property
    def num_workers(self) -> int:
        """The ``p`` of the paper: ranks that train."""
        return len(self.worker_ranks)

    @property
    def worker_index(self) -> int:
        """This rank's shard index among the workers (-1 if it does not train)."""
        return self.worker_ranks.index(self.rank) if self.rank in self.worker_ranks else -1

    def saved_by(self, old_size: int) -> int | None:
        """The rank whose file this rank resumes from, in a checkpoint written by
        ``old_size`` ranks: its own at the same size. At another size, a synchronous rank
        ``r`` reads rank ``r % old_size``'s; an asynchronous run's server ranks read their
        own, the tester the old tester's, and a worker none (it starts from the center)."""
        if old_size == self.world_size:
            return self.rank
        if not self.is_async:
            return self.rank % old_size
        if self.role == "tester":
            return old_size - 1
        return self.rank if self.role in ("server", "shard") else None

    @property
    def logs(self) -> bool:
        """Whether this rank owns the run directory's metrics and summary."""
        return self.rank == self.tester_rank
