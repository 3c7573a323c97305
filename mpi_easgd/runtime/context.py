"""What one run's roles share: the configuration, the communicators, where to write.

``train.py`` builds one :class:`RunContext` after validation and hands it to the role
(``sync.run_peer`` or ``asynchronous.run_async``), instead of a long list of arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from mpi4py import MPI

from mpi_easgd.config import Config
from mpi_easgd.data import DatasetInfo
from mpi_easgd.runtime.control import StopRequest
from mpi_easgd.topology import Topology


@dataclass(frozen=True)
class RunContext:
    cfg: Config
    comm: MPI.Comm  # every message of the run travels on it (async liveness: on a Dup of it)
    topo: Topology  # which role this rank plays
    info: DatasetInfo
    device: torch.device
    log: object  # RunLog on the rank that logs, NullRunLog elsewhere
    run_dir: Path
    stop: StopRequest  # set by SIGTERM / SIGUSR1 / SIGINT
    resume: Path | None  # the checkpoint to resume from
    transfer: str = "direct"  # how GPU tensors reach MPI: "direct" (CUDA-aware) or "staged"
    started: float = 0.0  # time.perf_counter() origin of the run's wall clock (goes on across resumes)
    identity: int | None = None  # a replacement worker: the rank it stands in for (its comm is an intercomm)
    hosts: tuple[str, ...] = ()  # every rank's host name, by rank

    @property
    def rank(self) -> int:
        return self.comm.Get_rank() if self.identity is None else self.identity
