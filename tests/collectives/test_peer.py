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
    state = Peer(ctx).state_dict(pos)
    old = {k: v for k, v in state.items() if k != "position"}
    old.update(epoch=1, step=4, stats=vars(pos.stats), skipped=2)
    resumed = Peer(ctx).load_state_dict(old)
    assert (resumed.epoch, resumed.step, resumed.skipped, resumed.stats) == (1, 4, 2, pos.stats)


def test_the_global_batch_is_kept_at_another_size(blobs, tmp_path):
    """--keep-global-batch: a state written by 4 ranks of batch 16 (global batch 64) taken
    up by one rank gives it batch 64 (its steps per epoch those of the 4 ranks), taken in
    micro-batches of 16; without the flag it keeps --batch-size."""
    import dataclasses

    from mpi_easgd.collectives.peer import Peer
    from mpi_easgd.data import read_info
    from mpi_easgd.runtime.context import RunContext
    from mpi_easgd.runtime.control import StopRequest
    from mpi_easgd.topology import Topology

    info = read_info(blobs)
    for keep, batch in ((True, 64), (False, 16)):
        cfg = Config(algo="sgd", model="mlp", dataset=str(blobs), batch_size=16, keep_global_batch=keep).resolve(1)
        ctx = RunContext(cfg, SELF, Topology.build(1, 0, "sgd"), info, torch.device("cpu"), NullRunLog(), tmp_path,
                         StopRequest(), None)
        peer = Peer(ctx)
        assert peer.batch == 16 and peer.global_batch == 16  # (a run that starts on one rank)
        peer.load_state_dict(dict(peer.state_dict(Position()), global_batch=64))
        assert peer.batch == batch and peer.steps == info.sizes["train"] // batch, keep
        assert peer.batch_at(3) == (21 if keep else 16)  # (64 / 3, to the nearest sample)
        assert dataclasses.asdict(cfg)["keep_global_batch"] is keep
