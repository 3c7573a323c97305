"""The command line's synchronous role in this process (one rank on ``MPI.COMM_SELF``)."""

from __future__ import annotations

import torch
from mpi4py import MPI

from mpi_easgd.config import Config
from mpi_easgd.runtime.loop import Position
from mpi_easgd.runtime.metrics import NullRunLog

SELF = MPI.COMM_SELF


def test_a_sync_checkpoint_of_the_earlier_layout_still_resumes(blobs, tmp_path):
    """Checkpoints written before the one loop kept the position's fields (epoch, step,
    stats, skipped) at the top level of each rank's file; they must resume the same."""
    from mpi_easgd.collectives.peer import Peer
    from mpi_easgd.data import read_info
    from mpi_easgd.runtime.context import RunContext
    from mpi_easgd.runtime.control import StopRequest
    from mpi_easgd.runtime.loop import EpochStats
    from mpi_easgd.topology import Topology

    cfg = Config(algo="sgd", model="mlp", dataset=str(blobs)).resolve(1)
    ctx = RunContext(cfg, SELF, Topology.build(1, 0, "sgd"), read_info(blobs), torch.device("cpu"), NullRunLog(),
                     tmp_path, StopRequest(), None)
    pos = Position(epoch=1, step=4, t=20, skipped=2, stats=EpochStats(loss_sum=1.5, batches=4, samples=64))
    state = Peer(ctx, steps=16).state_dict(pos)
    old = {k: v for k, v in state.items() if k != "position"}
    old.update(epoch=1, step=4, stats=vars(pos.stats), skipped=2)
    resumed = Peer(ctx, steps=16).load_state_dict(old)
    assert (resumed.epoch, resumed.step, resumed.skipped, resumed.stats) == (1, 4, 2, pos.stats)
