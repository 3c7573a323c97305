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
  Exact mean-value analysis of this closed network gives the exchange rate ``X``; a worker's
  cycle is ``W / X`` and its utilization ``tau t X / W``. (One worker alone: ``tau t + P
  c_w + 2 L + 2 m / B + P c / S``.)
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
from dataclasses import dataclass
from pathlib import Path

ASYNC = ("easgd", "downpour", "async-diloco")
SYNC = ("sgd", "ea", "diloco")
WIRE_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0}


@dataclass(frozen=True)
class Machine:
    """The constants of the machine (or cluster) a run is planned for."""

    latency: float  # seconds, one way
    bandwidth: float  # bytes per second of one rank's link
    reduce: float  # seconds per byte an Allreduce spends reducing (beyond moving the bytes)
    server_update: float  # seconds per parameter of the server's update, per exchange
    worker_update: float  # seconds per parameter of a worker's side of the rule

    def with_link(self, bandwidth: float | None = None, latency: float | None = None) -> Machine:
        return dataclasses.replace(self, bandwidth=bandwidth or self.bandwidth,
                                   latency=self.latency if latency is None else latency)


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


@dataclass(frozen=True)
class Prediction:
    """What :func:`predict` expects of one algorithm on one workload."""

    algo: str
    exchanges_per_second: float  # server updates (async) or rounds (sync), the whole run
    compute_utilization: float  # a worker's computing share of its time
    samples_per_second: float
    bytes_per_sample: float  # sent and received by a worker (or rank), per sample it computes
    bottleneck: str  # compute, worker link, server link, server arithmetic, network
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
    station with ``demand`` seconds of service (exact mean-value analysis)."""
    if demand <= 0:
        return customers / think if think > 0 else math.inf
    queue, throughput = 0.0, 0.0
    for n in range(1, customers + 1):
        response = demand * (1 + queue)
        throughput = n / (think + response)
        queue = throughput * response
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
    link_server = 2 * msg / (w.servers * m.bandwidth)
    arithmetic = w.params / w.servers * m.server_update
    demand = link_server + arithmetic
    think = compute + w.params * m.worker_update + 2 * m.latency + 2 * msg * (1 - 1 / w.servers) / m.bandwidth
    rate = closed_network(think, demand, w.workers)
    busy = rate * demand
    utilization = compute * rate / w.workers
    # Which resource limits: the server once it is nearly always busy, else what the
    # worker's own cycle spends most on besides computing.
    if busy > 0.8:
        neck = "server arithmetic" if arithmetic >= link_server else "server link"
    else:
        worker_link = 2 * m.latency + 2 * msg / m.bandwidth
        neck = "compute" if compute >= max(worker_link, arithmetic) else "worker link"
    samples = rate * w.tau * w.batch
    return Prediction(algo, rate, utilization, samples, 2 * msg / (w.tau * w.batch), neck, busy)


def predict_sync(algo: str, w: Workload, m: Machine) -> Prediction:
    """sgd (every step) and ea / diloco (every ``tau`` steps), on ``w.workers`` ranks."""
    n, msg = w.workers, w.params * w.wire_bytes
    steps = 1 if algo == "sgd" else w.tau
    gathered = algo != "sgd" and w.wire_bytes < 2  # the compressed formats are gathered, not reduced
    if gathered:
        network, moved = ring_allgather(n, msg, m), 2 * (n - 1) * msg
    else:
        network, moved = ring_allreduce(n, msg, m), 4 * (n - 1) / n * msg
    rule = 0.0 if algo == "sgd" else w.params * m.worker_update
    compute = steps * w.step_seconds
    cycle = compute + network + rule
    neck = "compute" if compute >= network else "network"
    return Prediction(algo, 1 / cycle, compute / cycle, n * steps * w.batch / cycle, moved / (steps * w.batch), neck)


def predict(algo: str, w: Workload, m: Machine) -> Prediction:
    """:func:`predict_async` or :func:`predict_sync`, by ``algo``."""
    return predict_async(algo, w, m) if algo in ASYNC or algo == "eamsgd" else predict_sync(algo, w, m)


def servers_needed(w: Workload, m: Machine, busy: float = 0.8, most: int = 1024) -> int:
    """The fewest server ranks (a power of two) that keep the server's busy share at or
    below ``busy`` for ``w.workers`` workers."""
    s = 1
    while s < most and predict_async("easgd", dataclasses.replace(w, servers=s), m).server_busy > busy:
        s *= 2
    return s


# ---- calibration --------------------------------------------------------------------


def calibrate(comm, params: int = 4 << 20, repeats: int = 8) -> Machine:
    """Measure this machine's constants on ranks 0 and 1 of ``comm`` (every rank returns
    them): the one-way latency of an 8-byte message and the bandwidth of messages of 1 to
    32 MB (round trips between the two), the seconds per byte an ``Allreduce`` spends
    beyond moving bytes (its reduction), and rank 0's seconds per parameter of the easgd
    server's and worker's updates on ``params`` parameters."""
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
        nbytes = reduced.nbytes
        allreduce = _seconds(lambda: pair.Allreduce(MPI.IN_PLACE, reduced), repeats, pair)
        moved = 2 * latency + nbytes / bandwidth  # the ring formula's traffic for 2 ranks
        reduce = max(allreduce - moved, 0.0) / (nbytes / 2)
        server = worker = 0.0
        if pair.rank == 0:
            center, incoming, x = (torch.randn(params) for _ in range(3))
            rule, side = server_rule("easgd", 0.45), worker_rule("easgd", x, 0.45)
            server = _seconds(lambda: rule.exchange(center, incoming), repeats) / params
            side.reply.copy_(center)  # (what a worker reads after an exchange)
            worker = _seconds(side.absorb, repeats) / params
        constants = pair.bcast((latency, bandwidth, reduce, server, worker), root=0)
        pair.Free()
    latency, bandwidth, reduce, server, worker = comm.bcast(constants, root=0)
    return Machine(latency=latency, bandwidth=bandwidth, reduce=reduce, server_update=server, worker_update=worker)


def _seconds(fn, repeats: int, comm=None) -> float:
    """The fastest of ``repeats`` calls of ``fn`` (after one to warm up); with ``comm``,
    every call starts together on its ranks and the slowest rank's time counts."""
    import time

    fn()
    best = math.inf
    for _ in range(repeats):
        if comm is not None:
            comm.Barrier()
        t0 = time.perf_counter()
        fn()
        took = time.perf_counter() - t0
        best = min(best, comm.allreduce(took, op=_max()) if comm is not None else took)
    return best


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
        sgd, ea = predict("sgd", dataclasses.replace(at, wire_bytes=4.0), m), predict("ea", at, m)
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
        ys = [predict(algo, dataclasses.replace(w, workers=n, wire_bytes=4.0 if algo == "sgd" else w.wire_bytes),
                      m).compute_utilization for n in ns]
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
    p.add_argument("--batch", type=int, default=32, help="samples per local step")
    p.add_argument("--exchange-dtype", default="float32",
                   choices=("float32", "float16", "bfloat16", "int8", "int4", "topk"))
    p.add_argument("--calibration", type=Path, help="a JSON file written by --calibrate (default: measure now)")
    p.add_argument("--calibrate", type=Path, metavar="FILE",
                   help="measure this machine (under mpiexec -n 2, or it launches that) and write FILE")
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
        m = _measure()
    return m.with_link(args.bandwidth_gbps * 1e9 / 8 if args.bandwidth_gbps else None,
                       args.latency_us * 1e-6 if args.latency_us is not None else None)


def _measure(path: Path | None = None) -> Machine:
    """Calibrate on two ranks: here if this process is one of two, else by launching them."""
    import os
    import subprocess
    import tempfile

    from mpi4py import MPI  # (python -m mpi_easgd.plan has imported the package first, as it must)

    comm = MPI.COMM_WORLD
    if comm.size >= 2:
        m = calibrate(comm)
        if path is not None and comm.rank == 0:
            path.write_text(json.dumps(dataclasses.asdict(m), indent=1) + "\n")
        return m
    out = path or Path(tempfile.mkstemp(suffix=".json")[1])
    mpiexec = Path(sys.executable).with_name("mpiexec")
    cmd = [str(mpiexec) if mpiexec.exists() else "mpiexec", "-n", "2", sys.executable, "-m", "mpi_easgd.plan",
           "--calibrate", str(out)]
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
        m = _measure(args.calibrate)
        if args.calibrate.exists():
            print(f"calibration written to {args.calibrate}: {_describe(m)}")
        return 0
    bad = [f"--{k.replace('_', '-')} must be positive" for k in ("params", "step_ms", "tau", "workers", "servers",
                                                                   "batch") if getattr(args, k) <= 0]
    if bad:
        print(f"mpi_easgd.plan: error: {bad[0]}", file=sys.stderr)
        return 2
    m = machine_from(args)
    w = Workload(params=int(args.params), step_seconds=args.step_ms / 1e3, tau=args.tau, workers=args.workers,
                 servers=args.servers, batch=args.batch, wire_bytes=wire_bytes(args.exchange_dtype, int(args.params)))
    print(f"machine: {_describe(m)}")
    print(f"workload: {w.params:,} parameters, {args.step_ms:g} ms/step, tau {w.tau}, {w.workers} workers, "
          f"{w.servers} server rank(s), batch {w.batch}, {args.exchange_dtype} ({w.wire_bytes:.3g} bytes/parameter)\n")
    rows = []
    for algo in (*ASYNC, *SYNC):
        at = dataclasses.replace(w, wire_bytes=4.0) if algo == "sgd" else w
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
    return (f"link {m.bandwidth * 8 / 1e9:.3g} Gb/s, latency {m.latency * 1e6:.3g} us, reduction "
            f"{m.reduce * 1e9:.3g} ns/byte; server update "
            f"{m.server_update * 1e9:.3g} ns/parameter, worker update {m.worker_update * 1e9:.3g} ns/parameter")


if __name__ == "__main__":
    sys.exit(main())
