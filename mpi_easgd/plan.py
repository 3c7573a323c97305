"""A cost model of a run's exchanges, to size a run before it is launched:
``python -m mpi_easgd.plan``.

For each algorithm it predicts the exchanges (or synchronous rounds) per second, the share
of a worker's time spent computing (``compute_utilization``, as the run's summary reports
it), the bytes each sample costs, and the resource that limits the run: compute, a
worker's link, the server's link or the server's arithmetic. ``--calibrate`` measures the
machine constants it needs (a message's latency and bandwidth, what an Allreduce spends
reducing, and the updates' seconds per parameter) on the machine at hand; a cluster's link can be given
instead (``--bandwidth-gbps``, ``--latency-us``).

The model (pure functions below; seconds and bytes throughout). ``P`` parameters, ``e``
bytes per parameter on the wire (4 for float32, 0.51 for int4...), so ``m = P e`` bytes
per message; a link has latency ``L`` (one way) and bandwidth ``B``.

- **Asynchronous** (easgd, eamsgd, downpour, async-diloco). A worker computes ``tau``
  steps of ``t`` seconds, applies its side of the rule (``P c_w``), then exchanges: ``m``
  bytes out, ``m`` back. The center is split over ``S`` server ranks, each with its own
  link: it receives and sends ``m / S`` bytes and updates ``P / S`` parameters (``c``
  seconds each). The server ranks are one queue that every exchange visits, with demand
  ``D = (P / S)(2 e / B + c)``; the ``W`` workers spend ``Z = tau t + P c_w + 2 L + 2 m (1
  - 1/S) / B`` away from it (the part of their own transfer that no server link carries).
  Mean-value analysis of this closed network (service of fixed length) gives the exchange
  rate ``X``; a worker's cycle is ``W / X`` and its utilization ``tau t X / W``. (One worker alone: ``tau t + P
  c_w + 2 L + 2 m / B + P c / S``.)
- **Groups** (``--groups G``, ``group_tau``): one worker in G exchanges, for its group; a
  group's cycle adds its own rounds, ``tau / group_tau`` averages of the float32
  parameters among G and the leader's broadcast (:func:`grouped`).
- **Synchronous**, ring formulas: an Allreduce of ``m`` bytes among ``n`` ranks takes
  ``2 (n - 1)(L + m / (n B)) + (n - 1) m r / n`` (``r``: seconds per byte reduced), an
  Allgather of each rank's ``m`` (the compressed formats) ``(n - 1)(L + m / B)``. sgd
  reduces the gradients every step; ea and diloco exchange every ``tau`` steps and apply
  their rule (``P c_w``).

What it leaves out: compute that slows down when ranks share cores (give the step time
measured at the run's own density), the tester's snapshots (one message every
``--test-every`` updates), congestion between messages that share a link, and
stragglers. :func:`servers_needed` answers how many server shards keep the server from
limiting a given number of workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mpi_easgd import registry

ASYNC = ("easgd", "downpour", "async-diloco")  # what the table shows (eamsgd's exchanges are easgd's)
SYNC = ("sgd", "ea", "diloco")
WIRE_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0}


@dataclass(frozen=True)
class Machine:
    """The constants of the machine (or cluster) a run is planned for."""

    latency: float  # seconds, one way
    bandwidth: float  # bytes per second of a worker's link
    reduce: float  # seconds per byte an Allreduce spends reducing (beyond moving the bytes)
    server_update: float  # seconds per parameter of the server's update, per exchange (easgd)
    worker_update: float  # seconds per parameter of an async worker's side of the rule
    round_overhead: dict = field(default_factory=dict)  # sync algo -> seconds per parameter a round
    # spends beyond its ring Allreduce (the rule, copies, scaling), measured on 2 ranks
    server_rules: dict = field(default_factory=dict)  # async algo -> its server update, if not easgd's
    server_bandwidth: float | None = None  # a server rank's link, if not a worker's
    params: int | None = None  # the model size the per-parameter costs were measured at (caches
    # make them depend on it: an ea round cost 1.7 ns a parameter at 4 M here, 3.6 at 11 M)

    def with_link(self, bandwidth: float | None = None, latency: float | None = None) -> Machine:
        """The same machine with the links given (server links too)."""
        return dataclasses.replace(self, bandwidth=bandwidth or self.bandwidth, server_bandwidth=None
                                   if bandwidth else self.server_bandwidth,
                                   latency=self.latency if latency is None else latency)

    @property
    def server_link(self) -> float:
        return self.server_bandwidth or self.bandwidth


@dataclass(frozen=True)
class Workload:
    """What is trained, how, and on how many ranks."""

    params: int
    step_seconds: float  # one local step's compute, as measured at the run's density
    tau: int = 10
    workers: int = 2
    servers: int = 1
    batch: int = 32  # samples per local step
    wire_bytes: float = 4.0  # bytes per parameter in a message (see wire_bytes)
    group: int = 1  # (async --groups) workers per group: one of them exchanges for all
    group_tau: int = 0  # steps between two averages within a group (0: tau)


@dataclass(frozen=True)
class Prediction:
    """What :func:`predict` expects of one algorithm on one workload."""

    algo: str
    exchanges_per_second: float  # server updates (async) or rounds (sync), the whole run
    compute_utilization: float  # a worker's computing share of its time
    samples_per_second: float
    bytes_per_sample: float  # sent and received by a worker (or rank), per sample it computes
    bottleneck: str  # the largest share of a worker's cycle: compute, worker link, server link,
    # server arithmetic (async); compute, network, round arithmetic (sync)
    server_busy: float | None = None  # the server ranks' busy share (async)


def wire_bytes(fmt: str, params: int = 1 << 20, topk_fraction: float | None = None) -> float:
    """Bytes per parameter of a message in ``fmt`` (``--exchange-dtype``), from the codec's
    own layout for the compressed formats."""
    if fmt in WIRE_BYTES:
        return WIRE_BYTES[fmt]
    from mpi_easgd.compress import TOPK_FRACTION, codec

    return codec(fmt, topk_fraction or TOPK_FRACTION).nbytes(params) / params


def closed_network(think: float, demand: float, customers: int) -> float:
    """Throughput of ``customers`` that each spend ``think`` seconds away, then queue for one
    station with ``demand`` seconds of service. Mean-value analysis with a fixed service
    time (every exchange of one model costs the same): an arrival waits for the customers
    queued ahead of it and for half the service of the one being served (exponential
    service would be a whole one: with 2 workers on a busy server that predicted 0.83 of
    the measured rate here, this 0.98)."""
    if demand <= 0:
        return customers / think if think > 0 else math.inf
    queue = busy = throughput = 0.0
    for n in range(1, customers + 1):
        response = demand * (1 + queue - busy / 2)
        throughput = min(n / (think + response), 1 / demand)  # (the half is an approximation: keep it in bounds)
        queue, busy = throughput * response, throughput * demand
    return throughput


def ring_allreduce(ranks: int, nbytes: float, m: Machine) -> float:
    """Seconds of a ring Allreduce of ``nbytes`` among ``ranks``: ``2 (n - 1)`` messages of
    ``nbytes / n``, and ``(n - 1) / n`` of the bytes reduced."""
    if ranks < 2:
        return 0.0
    return 2 * (ranks - 1) * (m.latency + nbytes / (ranks * m.bandwidth)) + (ranks - 1) / ranks * nbytes * m.reduce


def ring_allgather(ranks: int, nbytes: float, m: Machine) -> float:
    """Seconds of a ring Allgather of each rank's ``nbytes``."""
    return (ranks - 1) * (m.latency + nbytes / m.bandwidth) if ranks > 1 else 0.0


def predict_async(algo: str, w: Workload, m: Machine) -> Prediction:
    """The asynchronous family (module docstring)."""
    msg = w.params * w.wire_bytes
    compute = w.tau * w.step_seconds
    link_server = 2 * msg / (w.servers * m.server_link)
    arithmetic = w.params / w.servers * m.server_rules.get(algo, m.server_update)
    demand = link_server + arithmetic
    own_link = max(2 * msg / m.bandwidth - link_server, 0.0)  # what the server links do not carry
    # (--groups) a group's rounds: averages every group_tau steps and a broadcast per exchange
    group = grouped(w, m)
    exchanging = -(-w.workers // w.group)
    think = compute + group + w.params * m.worker_update + 2 * m.latency + own_link
    rate = closed_network(think, demand, exchanging)
    at_server = exchanging / rate - think  # waiting for a server rank, and being served
    # The bottleneck: the server once it is saturated, else what takes the largest share of
    # a worker's cycle (the server's share, queueing included, named by the larger part of
    # its demand).
    busy = rate * demand
    server = "server arithmetic" if arithmetic >= link_server else "server link"
    shares = {"compute": compute, "worker update": w.params * m.worker_update,
              "worker link": 2 * m.latency + own_link, server: at_server, "group rounds": group}
    neck = server if busy > 0.8 else max(shares, key=shares.get)
    utilization = compute * rate / exchanging
    samples = rate * w.tau * w.batch * w.workers / exchanging
    moved = 2 * msg / (w.group * w.tau * w.batch)  # to the server, per sample of the group
    return Prediction(algo, rate, utilization, samples, moved, neck, busy)


def grouped(w: Workload, m: Machine) -> float:
    """Seconds a group spends in its own rounds per exchange (``--groups``): an average of
    the float32 parameters every ``group_tau`` steps (``tau / group_tau`` of them, one more
    before the exchange if that does not divide ``tau``), each a ring Allreduce plus what a
    synchronous round adds to one (sgd's, calibrated: the scaling pass and the pieces), and
    the leader's broadcast after the exchange (``log2 G`` latencies and the bytes once)."""
    if w.group <= 1:
        return 0.0
    every = w.group_tau or w.tau
    averages = w.tau // every + (w.tau % every != 0)
    nbytes = w.params * 4.0
    average = ring_allreduce(w.group, nbytes, m) + w.params * m.round_overhead.get("sgd", m.worker_update)
    share = math.ceil(math.log2(w.group)) * m.latency + nbytes / m.bandwidth
    return averages * average + share


def predict_sync(algo: str, w: Workload, m: Machine) -> Prediction:
    """sgd (every step) and ea / diloco (every ``tau`` steps), on ``w.workers`` ranks."""
    n, msg = w.workers, w.params * w.wire_bytes
    periodic = "tau" in registry.lookup(algo).uses  # (sgd reduces gradients every step)
    steps = w.tau if periodic else 1
    gathered = periodic and w.wire_bytes < 2  # the compressed formats are gathered, not reduced
    if gathered:
        network, moved = ring_allgather(n, msg, m), 2 * (n - 1) * msg
    else:
        network, moved = ring_allreduce(n, msg, m), 4 * (n - 1) / n * msg
    rule = w.params * m.round_overhead.get(algo, m.worker_update)
    compute = steps * w.step_seconds
    cycle = compute + network + rule
    shares = {"compute": compute, "network": network, "round arithmetic": rule}  # (the reduction is network)
    neck = max(shares, key=shares.get)
    return Prediction(algo, 1 / cycle, compute / cycle, n * steps * w.batch / cycle, moved / (steps * w.batch), neck)


def _wire(w: Workload, algo: str) -> Workload:
    """``w`` as ``algo`` runs it: float32 where it has no other exchange format (sgd)."""
    return w if "exchange_dtype" in registry.lookup(algo).uses else dataclasses.replace(w, wire_bytes=4.0)


def predict(algo: str, w: Workload, m: Machine) -> Prediction:
    """:func:`predict_async` or :func:`predict_sync`, by ``algo``."""
    return predict_async(algo, w, m) if registry.lookup(algo).is_async else predict_sync(algo, w, m)


def servers_needed(w: Workload, m: Machine, busy: float = 0.8, most: int = 1024) -> int:
    """The fewest server ranks (a power of two) that keep the server's busy share at or
    below ``busy`` for ``w.workers`` workers."""
    s = 1
    while s < most and predict_async("easgd", dataclasses.replace(w, servers=s), m).server_busy > busy:
        s *= 2
    return s


# ---- calibration --------------------------------------------------------------------


def calibrate(comm, params: int = 11_200_000, repeats: int = 8, gap: float = 0.01) -> Machine:
    """Measure this machine's constants on ranks 0 and 1 of ``comm`` (every rank returns
    them; medians, as a run lives with typical times, not the best): the one-way latency
    of an 8-byte message and the bandwidth of messages of 1 to 32 MB (round trips between
    the two); the seconds per byte an ``Allreduce`` of ``params`` floats spends beyond the
    ring formula's transfers (its reduction); what a round of sgd, ea and diloco (the
    package's own classes) spends beyond that Allreduce, per parameter, each round after
    ``gap`` seconds idle as in a run (straight after another it took 20% less here); and
    each async server rule's update and the easgd worker's, per parameter. Measure at the size of the
    model planned for: the per-parameter costs depend on it."""
    import numpy as np
    import torch
    from mpi4py import MPI

    from mpi_easgd.rules.asynchronous import server_rule, worker_rule

    pair = comm.Split(0 if comm.rank < 2 else MPI.UNDEFINED, comm.rank)
    constants = None
    if pair != MPI.COMM_NULL:
        sizes = [8, 1 << 20, 8 << 20, 32 << 20]
        one_way = []
        for size in sizes:
            buf = np.zeros(size, np.uint8)

            def round_trip(buf=buf):
                if pair.rank == 0:
                    pair.Send(buf, 1)
                    pair.Recv(buf, 1)
                else:
                    pair.Recv(buf, 0)
                    pair.Send(buf, 0)

            one_way.append(_seconds(round_trip, repeats, pair) / 2)
        latency = one_way[0]
        big = np.array(sizes[1:], float)
        bandwidth = float(big @ big / (big @ (np.array(one_way[1:]) - latency)))  # least squares through L
        reduced = np.ones(params, np.float32)
        ring = 2 * latency + reduced.nbytes / bandwidth  # the ring formula's transfers for 2 ranks
        allreduce = _seconds(lambda: pair.Allreduce(MPI.IN_PLACE, reduced), repeats, pair)
        reduce = max(allreduce - ring, 0.0) / (reduced.nbytes / 2)
        overhead = {algo: max(_seconds(call, repeats, pair, gap) - allreduce, 0.0) / params
                    for algo, call in _sync_rounds(pair, params).items()}
        rules, worker = {}, 0.0
        if pair.rank == 0:
            center, incoming, x = (torch.randn(params) for _ in range(3))
            for algo in ASYNC:
                rule = server_rule(algo, 0.45)
                rules[algo] = _seconds(lambda rule=rule: rule.exchange(center, incoming), repeats) / params
            side = worker_rule("easgd", x, 0.45)
            side.reply.copy_(center)  # (what a worker reads after an exchange)
            worker = _seconds(side.absorb, repeats) / params
        constants = pair.bcast(dict(latency=latency, bandwidth=bandwidth, reduce=reduce,
                                    server_update=rules.get("easgd", 0.0), server_rules=rules, worker_update=worker,
                                    round_overhead=overhead, params=params), root=0)
        pair.Free()
    return Machine(**comm.bcast(constants, root=0))


def _sync_rounds(comm, params: int) -> dict:
    """One round of each synchronous class on ``comm``, as calls (a model of ``params``
    parameters each; ea and diloco with tau 1, so that every call is a round)."""
    import torch

    from mpi_easgd import AllReduceDiLoCo, AllReduceEA, AllReduceSGD

    rounds = {}
    for algo, make in (("sgd", lambda: AllReduceSGD(comm)), ("ea", lambda: AllReduceEA(comm, tau=1, alpha=0.3)),
                       ("diloco", lambda: AllReduceDiLoCo(comm, tau=1))):
        model = torch.nn.Linear(params, 1, bias=False)
        model.weight.grad = torch.zeros_like(model.weight)
        sync = make()
        sync.synchronize_parameters(model)
        call = getattr(sync, "average_parameters", None) or sync.sum_and_normalize_gradients
        rounds[algo] = lambda call=call, model=model: call(model)
    return rounds


def _seconds(fn, repeats: int, comm=None, gap: float = 0.0) -> float:
    """The median of ``repeats`` calls of ``fn`` (after one to warm up), each after ``gap``
    seconds idle; with ``comm``, every call starts together on its ranks and the slowest
    rank's time counts."""
    import statistics
    import time

    fn()
    took = []
    for _ in range(repeats):
        if comm is not None:
            comm.Barrier()
        time.sleep(gap)
        t0 = time.perf_counter()
        fn()
        took.append(time.perf_counter() - t0)
        if comm is not None:
            took[-1] = comm.allreduce(took[-1], op=_max())
    return statistics.median(took)


def _max():
    from mpi4py import MPI

    return MPI.MAX


# ---- the command line ---------------------------------------------------------------


def table(rows: list[dict], columns: list[str]) -> str:
    """``rows`` as aligned text columns."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return "" if v is None else str(v)


def projection(w: Workload, m: Machine, scales: list[int]) -> list[dict]:
    """For each number of workers in ``scales``: easgd with one server, with the servers
    :func:`servers_needed` says, and sgd and ea on a ring of as many ranks."""
    rows = []
    for n in scales:
        at = dataclasses.replace(w, workers=n)
        needed = servers_needed(at, m)
        one, shard = predict("easgd", at, m), predict("easgd", dataclasses.replace(at, servers=needed), m)
        sgd, ea = predict("sgd", _wire(at, "sgd"), m), predict("ea", at, m)
        rows.append(dict(workers=n, easgd_S1_util=one.compute_utilization, S1_bottleneck=one.bottleneck,
                         servers_needed=needed, easgd_util=shard.compute_utilization,
                         sgd_util=sgd.compute_utilization, ea_util=ea.compute_utilization,
                         sgd_samples_s=sgd.samples_per_second, easgd_samples_s=shard.samples_per_second))
    return rows


def plot(w: Workload, m: Machine, path: Path, most: int = 512) -> None:
    """Compute utilization against workers (log scale): easgd with 1, 2, 4... server
    shards, sgd and ea on a ring; headless."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [2 ** k for k in range(1, int(math.log2(most)) + 1)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for s in (1, 4, 16, 64):
        ys = [predict("easgd", dataclasses.replace(w, workers=n, servers=s), m).compute_utilization for n in ns]
        ax.plot(ns, ys, marker="o", label=f"easgd, {s} server rank{'s' * (s > 1)}")
    for algo, style in (("sgd", "--"), ("ea", ":")):
        ys = [predict(algo, _wire(dataclasses.replace(w, workers=n), algo), m).compute_utilization for n in ns]
        ax.plot(ns, ys, style, color="k", label=f"{algo} (ring Allreduce)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("workers")
    ax.set_ylabel("compute utilization")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{w.params / 1e6:.1f} M parameters, {w.step_seconds * 1e3:g} ms/step, tau {w.tau}, "
                 f"{m.bandwidth * 8 / 1e9:.3g} Gb/s, {m.latency * 1e6:.3g} us", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpi_easgd.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=float, default=11.2e6, help="parameters of the model (default 11.2e6, resnet18)")
    p.add_argument("--step-ms", type=float, default=100.0, help="one local step's compute, in milliseconds")
    p.add_argument("--tau", type=int, default=10, help="local steps between exchanges (ea, diloco, async)")
    p.add_argument("--workers", type=int, default=8, help="workers (async) or ranks (sync)")
    p.add_argument("--servers", type=int, default=1, help="server ranks the center is split over (async)")
    p.add_argument("--groups", type=int, default=1, help="workers per group, one exchanging for all (async)")
    p.add_argument("--group-tau", type=int, default=0, help="steps between two averages in a group (0: tau)")
    p.add_argument("--batch", type=int, default=32, help="samples per local step")
    p.add_argument("--exchange-dtype", default="float32",
                   choices=("float32", "float16", "bfloat16", "int8", "int4", "topk"))
    p.add_argument("--calibration", type=Path, help="a JSON file written by --calibrate (default: measure now)")
    p.add_argument("--calibrate", type=Path, metavar="FILE",
                   help="measure this machine at --params (under mpiexec -n 2, or it launches that) and write FILE")
    p.add_argument("--bandwidth-gbps", type=float, help="a link's bandwidth instead of the calibrated one")
    p.add_argument("--latency-us", type=float, help="a link's one-way latency instead of the calibrated one")
    p.add_argument("--project", type=int, nargs="*", default=[64, 256, 512], help="workers to project to")
    p.add_argument("--plot", type=Path, help="write the projection as a PNG")
    return p


def machine_from(args) -> Machine:
    """The calibration file, else a fresh measurement; then the link given, if any."""
    if args.calibration is not None:
        try:
            m = Machine(**json.loads(args.calibration.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise SystemExit(f"mpi_easgd.plan: error: cannot read the calibration {args.calibration} ({exc}); "
                             f"write one with python -m mpi_easgd.plan --calibrate FILE") from None
    else:
        m = _measure(int(args.params))
    return m.with_link(args.bandwidth_gbps * 1e9 / 8 if args.bandwidth_gbps else None,
                       args.latency_us * 1e-6 if args.latency_us is not None else None)


def _measure(params: int, path: Path | None = None) -> Machine:
    """Calibrate on two ranks: here if this process is one of two, else by launching them."""
    import os
    import subprocess
    import tempfile

    from mpi4py import MPI  # (python -m mpi_easgd.plan has imported the package first, as it must)

    comm = MPI.COMM_WORLD
    if comm.size >= 2:
        m = calibrate(comm, params)
        if path is not None and comm.rank == 0:
            path.write_text(json.dumps(dataclasses.asdict(m), indent=1) + "\n")
        return m
    out = path or Path(tempfile.mkstemp(suffix=".json")[1])
    mpiexec = Path(sys.executable).with_name("mpiexec")
    cmd = [str(mpiexec) if mpiexec.exists() else "mpiexec", "-n", "2", sys.executable, "-m", "mpi_easgd.plan",
           "--calibrate", str(out), "--params", str(params)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    if done.returncode != 0:
        raise SystemExit(f"mpi_easgd.plan: error: the calibration failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    m = Machine(**json.loads(out.read_text()))
    if path is None:
        out.unlink()
    return m


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.calibrate is not None:
        m = _measure(int(args.params), args.calibrate)
        if args.calibrate.exists():
            print(f"calibration written to {args.calibrate}: {_describe(m)}")
        return 0
    bad = [f"--{k.replace('_', '-')} must be positive" for k in ("params", "step_ms", "tau", "workers", "servers",
                                                                   "batch", "groups") if getattr(args, k) <= 0]
    if bad:
        print(f"mpi_easgd.plan: error: {bad[0]}", file=sys.stderr)
        return 2
    m = machine_from(args)
    w = Workload(params=int(args.params), step_seconds=args.step_ms / 1e3, tau=args.tau, workers=args.workers,
                 servers=args.servers, batch=args.batch, wire_bytes=wire_bytes(args.exchange_dtype, int(args.params)),
                 group=args.groups, group_tau=args.group_tau)
    print(f"machine: {_describe(m)}")
    groups = f" in groups of {w.group} (averaging every {w.group_tau or w.tau} steps)" if w.group > 1 else ""
    print(f"workload: {w.params:,} parameters, {args.step_ms:g} ms/step, tau {w.tau}, {w.workers} workers{groups}, "
          f"{w.servers} server rank(s), batch {w.batch}, {args.exchange_dtype} ({w.wire_bytes:.3g} bytes/parameter)\n")
    rows = []
    for algo in (*ASYNC, *SYNC):
        at = _wire(w, algo)
        p = predict(algo, at, m)
        rows.append(dict(algo=algo, exchanges_s=p.exchanges_per_second, utilization=p.compute_utilization,
                         samples_s=p.samples_per_second, bytes_per_sample=p.bytes_per_sample,
                         server_busy=p.server_busy, bottleneck=p.bottleneck))
    print(table(rows, list(rows[0])))
    if args.project:
        print("\nprojection (servers_needed keeps the server under 80% busy):\n")
        proj = projection(w, m, args.project)
        print(table(proj, list(proj[0])))
    if args.plot is not None:
        plot(w, m, args.plot, max(args.project or [512]))
        print(f"\nplot written to {args.plot}")
    return 0


def _describe(m: Machine) -> str:
    rounds = ", ".join(f"{algo} {v * 1e9:.3g}" for algo, v in m.round_overhead.items())
    at = f" (measured at {m.params:,} parameters)" if m.params else ""
    servers = ", ".join(f"{algo} {v * 1e9:.3g}" for algo, v in (m.server_rules or {"easgd": m.server_update}).items())
    return (f"link {m.bandwidth * 8 / 1e9:.3g} Gb/s, latency {m.latency * 1e6:.3g} us, reduction "
            f"{m.reduce * 1e9:.3g} ns/byte; per parameter: server update {servers} ns, "
            f"worker update {m.worker_update * 1e9:.3g} ns, a sync round beyond its Allreduce: {rounds or '-'} ns{at}")


if __name__ == "__main__":
    sys.exit(main())
