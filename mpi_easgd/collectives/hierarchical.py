"""HierarchicalAveraging: model averaging at several levels, each with its own period
(hierarchical local SGD, Lin et al. 2020; torch's ``HierarchicalModelAverager`` on MPI).

``levels`` maps a period to a group: ``{4: 8, 16: 64}`` averages the parameters among each
group of 8 consecutive ranks every 4 steps and among all 64 every 16. A group is a number
of ranks or ``"node"``: the ranks that share a node's memory (``MPI_Comm_split_type``
shared), the level whose traffic never leaves the machine. Call
:meth:`HierarchicalAveraging.average_parameters` after every optimizer step. At a step
divisible by several periods only the largest one's group averages (it contains the
smaller ones), and nothing is averaged during the first ``warmup_steps`` calls: torch's
semantics exactly, tested against it.

The average is an ``Allreduce`` of the flat parameters, in pieces as the other classes do
(each rank's share divided by the group's size first, as torch does), on a communicator
made once per level by ``Split``.
"""

from __future__ import annotations

from mpi4py import MPI
from torch import nn

from mpi_easgd.collectives.base import Collective, FlatCache, bcast_module_state
from mpi_easgd.runtime.watchdog import CollectiveGuard
from mpi_easgd.transfer import allreduce, chunk_size

NODE = "node"


def check_levels(levels: dict, size: int) -> list[tuple[int, int | str]]:
    """``levels`` as ``[(period, group)]`` by period, or ValueError naming what is wrong and
    what would do: periods positive and increasing, each group a divisor of ``size`` (or
    ``"node"``) and larger than the one before, the last one every rank."""
    if not levels:
        raise ValueError("levels must name at least one period and group, e.g. {4: 8, 16: world size}")
    items = list(levels.items())
    for period, group in items:
        if not isinstance(period, int) or period < 1:
            raise ValueError(f"each period must be an integer >= 1 (steps); got {period!r}")
        if group != NODE and (not isinstance(group, int) or group < 1 or size % group):
            raise ValueError(f"each group must be 'node' or a number of ranks that divides {size}; got {group!r}")
    periods = [p for p, _ in items]
    if periods != sorted(set(periods)):
        raise ValueError(f"the periods must increase from level to level; got {periods}")
    sizes = [g for _, g in items if g != NODE]
    if sizes != sorted(set(sizes)):
        raise ValueError(f"the groups must grow from level to level; got {[g for _, g in items]}")
    if items[-1][1] != size:
        raise ValueError(f"the last level must average every rank: its group must be {size}, the "
                         f"communicator's size; got {items[-1][1]!r}")
    return items


class HierarchicalAveraging(Collective):
    """Model averaging in a hierarchy of groups over ``comm`` (module docstring).

    ``levels``: ``{period: group}``, group a number of consecutive ranks or ``"node"``;
    ``warmup_steps``: calls before the first average. ``transfer``, ``chunk_bytes``,
    ``timeout`` and ``on_timeout`` as for the other synchronous classes."""

    def __init__(self, comm: MPI.Comm, levels: dict, warmup_steps: int = 0, *, transfer: str = "auto",
                 chunk_bytes: int | None = None, timeout: float | None = 300.0, on_timeout: str = "warn") -> None:
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0; got {warmup_steps!r}")
        self.comm = comm
        self.chunk_bytes = chunk_size(chunk_bytes)
        self.levels = check_levels(levels, comm.Get_size())
        self.warmup_steps = warmup_steps
        self.step = 0  # calls of average_parameters so far
        self.groups: list[tuple[int, MPI.Comm]] = []  # (period, the communicator of this rank's group)
        for period, group in self.levels:
            if group == NODE:
                sub = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
            elif group == comm.Get_size():
                sub = comm
            else:
                sub = comm.Split(comm.Get_rank() // group, key=comm.Get_rank())
            self.groups.append((period, sub))
        self.averages = [0] * len(self.levels)  # how many times each level averaged
        self._cache = FlatCache(transfer=transfer)
        self._guard = CollectiveGuard(comm, "HierarchicalAveraging", timeout, on_timeout)

    def synchronize_parameters(self, model: nn.Module) -> None:
        """Broadcast rank 0's parameters (frozen ones included) and buffers."""
        with self._guard("synchronize_parameters"):
            flat = self._cache.get(model)
            flat.check_views()
            bcast_module_state(self.comm, model, self._cache.data, root=0)

    def group_of(self, step: int) -> int | None:
        """The level that averages at ``step`` (0-based call count): the one with the
        largest period dividing it; None during warm-up or when none divides it."""
        if step < self.warmup_steps:
            return None
        return next((i for i in reversed(range(len(self.groups))) if step % self.groups[i][0] == 0), None)

    def average_parameters(self, model: nn.Module) -> bool:
        """After each optimizer step: average with this step's group, if any; whether it did."""
        level = self.group_of(self.step)
        self.step += 1
        if level is None:
            return False
        group = self.groups[level][1]
        with self._guard("average_parameters"):
            flat = self._cache.get(model)
            flat.data.div_(group.Get_size())  # (before the sum, as torch's average does)
            buf = self._cache.data
            buf.before_send()
            allreduce(group, buf, self.chunk_bytes)  # (in pieces, as the other classes: see transfer)
            buf.after_recv()
        self.averages[level] += 1
        self.all_rounds += 1
        return True

    def round_bytes(self) -> tuple[int, int]:
        flat = self._cache.flat
        n = flat.numel * flat.data.element_size() if flat is not None else 0
        return n, n

    def state_dict(self) -> dict:
        return {"step": self.step, "averages": list(self.averages)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.averages = [int(v) for v in state.get("averages", self.averages)]

    def close(self) -> None:
        super().close()
        for _, sub in self.groups:
            if sub is not self.comm and sub != MPI.COMM_NULL:
                sub.Free()
        self.groups = []
