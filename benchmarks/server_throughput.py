"""Parameter-server throughput against a raw MPI round trip of the same bytes.

Rank 0 serves the workers (ranks 1..n-2; the last rank is the tester, which only takes the
final center). Each worker does nothing but exchange. "ours" is the real :class:`Server`
(posted receives, Waitany, the elastic update, the reply, the end-of-run protocol); "raw" is rank 0
running ``Recv(any source)`` / ``Send`` back with no arithmetic, between the same ranks.
"raw+upd" is that loop with the server's arithmetic added (the same fused elastic update,
no protocol): the limit of any server that updates a center on this machine. The three
are timed alternately; prints total exchanges/s and the ratios ours / raw (target
>= 0.8), ours / raw+upd (what the protocol costs) and raw+upd / raw (what the arithmetic
costs). With ``--exchange-dtype float16`` (or bfloat16) "ours" exchanges 16-bit messages
(the server casts to and from its float32 center) while "raw" still moves float32: the
ratio is then what the narrower exchange buys. Run::

    mpiexec -n 4 python -m mpi4py benchmarks/server_throughput.py    # 2 workers
    mpiexec -n 5 python -m mpi4py benchmarks/server_throughput.py    # 3 workers
    mpiexec -n 4 python -m mpi4py benchmarks/server_throughput.py --exchange-dtype float16
    mpiexec -n 5 python -m mpi4py benchmarks/server_throughput.py --servers 2 --sizes 11e6
                      # 2 workers; also "ours2": the center split over ranks 0 and 1

With ``--servers 2`` rank 1 is the second server rank in "ours2" and sits idle in the
other variants, so that every variant has the same workers (ranks 2..n-2).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from mpi4py import MPI

from mpi_easgd.flat import flat_buffer
from mpi_easgd.ps.protocol import META_LEN, Command, Kind, Tag, WorkerEndpoint, shard_bounds, wait_politely
from mpi_easgd.ps.server import Server
from mpi_easgd.ps.shards import ShardServer, ShardServers
from mpi_easgd.rules.asynchronous import server_rule
from mpi_easgd.transfer import EXCHANGE_DTYPES, exchange_dtype, mpi_view

RAW = 99


FIRST_WORKER = 1  # rank 1 with --servers 2: then a shard server, or idle in the one-server variants


def ours(comm, n: int, exchanges: int, live, wire: torch.dtype = torch.float32, servers: int = 1) -> float:
    """The real server(s): with ``servers`` 2, ranks 0 and 1 each hold half of the center
    (:mod:`mpi_easgd.ps.shards`) and each worker's exchange goes to both."""
    rank, size = comm.rank, comm.size
    workers, tester = list(range(FIRST_WORKER, size - 1)), size - 1
    bounds = shard_bounds(n, servers)
    buf = flat_buffer(n)
    message, reply = (wire_buffer(n, wire) for _ in range(2))
    parts = [(mpi_view(message[a:b]), mpi_view(reply[a:b])) for a, b in bounds]
    options = dict(test_every=1e9, samples_per_exchange=1, save=lambda step, extra, written: True, wire=wire)
    comm.Barrier()
    start = time.perf_counter()
    if rank < servers:
        a, b = bounds[rank]
        rule = server_rule("easgd", 0.3)
        if rank == 0:
            shards = ShardServers(comm, list(range(1, servers)), 300.0) if servers > 1 else None
            Server(comm, live, buf[a:b], rule, workers, tester, shards=shards, **options).run()  # no files
            if shards is not None:
                shards.end(buf, bounds)
        else:
            ShardServer(comm, live, buf[a:b], rule, workers, tester, **options).run()
    elif rank == tester:  # takes snapshots until the final one, like the real tester
        meta = np.zeros(META_LEN, np.int64)
        while meta[0] != Kind.FINAL:
            wait_politely([comm.Irecv(meta, source=0, tag=Tag.SNAPSHOT_META)])  # as the real tester waits
            for k, (a, b) in enumerate(bounds):
                comm.Recv(buf[a:b].numpy(), source=k, tag=Tag.SNAPSHOT)
    elif rank in workers:  # a worker that only exchanges, through the workers' own endpoint
        endpoint = WorkerEndpoint(comm, live, 0, list(range(servers)))
        for _ in range(exchanges):
            endpoint.exchange(parts)
        endpoint.done(exchanges, 0, 0, False)
        while endpoint.inbox.wait()[0] != Command.END:  # the final checkpoint: nothing to save
            endpoint.saved(0)
    wait_politely([comm.Ibarrier()])  # ranks that finished first leave the CPU to those still at work
    return time.perf_counter() - start


def ours_sharded(comm, n: int, exchanges: int, live, wire: torch.dtype = torch.float32) -> float:
    return ours(comm, n, exchanges, live, wire, servers=2)


def wire_buffer(n: int, wire: torch.dtype) -> torch.Tensor:
    """A worker's message or reply buffer as the real worker has it: page-aligned memory from
    :func:`flat_buffer` (transparent huge pages), viewed as ``wire``."""
    if wire == torch.float32:
        return flat_buffer(n)
    return flat_buffer((n + 1) // 2).view(wire)[:n]


def raw(comm, n: int, exchanges: int, live=None, wire=None, update: bool = False) -> float:
    """Rank 0 answers ``Recv(any source)`` with ``Send``: the wire's speed. With ``update``
    it also applies the same fused elastic update as the server (``lerp``, written over the
    message) and replies with the previous center: the arithmetic's cost, with no protocol."""
    rank, size = comm.rank, comm.size
    buf, reply = flat_buffer(n), flat_buffer(n)
    comm.Barrier()
    start = time.perf_counter()
    if rank == 0:
        status = MPI.Status()
        for _ in range(exchanges * (size - 1 - FIRST_WORKER)):
            comm.Recv(buf.numpy(), source=MPI.ANY_SOURCE, tag=RAW, status=status)
            if update:  # the new center over the message, the old one goes back
                torch.lerp(reply, buf, 0.3, out=buf)
                buf, reply = reply, buf
            comm.Send((reply if update else buf).numpy(), dest=status.Get_source(), tag=RAW)
    elif FIRST_WORKER <= rank < size - 1:
        for _ in range(exchanges):
            comm.Sendrecv(buf.numpy(), dest=0, sendtag=RAW, recvbuf=reply.numpy(), source=0, recvtag=RAW)
    wait_politely([comm.Ibarrier()])
    return time.perf_counter() - start


def raw_update(comm, n: int, exchanges: int, live=None, wire=None) -> float:
    return raw(comm, n, exchanges, update=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 11e6], help="parameters")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--exchanges", type=int, default=0, help="per worker per timing (0: auto)")
    parser.add_argument("--exchange-dtype", default="float32", choices=list(EXCHANGE_DTYPES))
    parser.add_argument("--servers", type=int, default=1, choices=(1, 2),
                        help="2: also the center split over ranks 0 and 1 (rank 1 idle in the other variants)")
    args = parser.parse_args()
    global FIRST_WORKER
    FIRST_WORKER = args.servers
    wire = exchange_dtype(args.exchange_dtype)
    comm = MPI.COMM_WORLD
    if comm.size < 3:
        raise SystemExit("run with 4+ ranks: server, workers, tester")
    workers = comm.size - 1 - FIRST_WORKER
    live = comm.Dup()  # the server's liveness traffic
    if comm.rank == 0:
        print(f"{workers} workers; exchanges/s over all workers and each ratio: median of {args.pairs} rounds; "
              f"ours exchanges {args.exchange_dtype}, raw float32")
        print(f"{'parameters':>12}{'ours':>9}{'raw':>9}{'raw+upd':>9}{'ours/raw':>10}{'ours/raw+upd':>14}"
              f"{'raw+upd/raw':>13}" + (f"{'ours2':>9}{'ours2/ours':>12}{'ours2/raw+upd':>15}" if args.servers > 1
                                        else "") + "   ours/raw per round")
    variants = [("ours", ours), ("raw", raw), ("raw+upd", raw_update)]
    if args.servers > 1:
        variants.append(("ours2", ours_sharded))
    for size in args.sizes:
        n = int(size)
        k = args.exchanges or max(5, int(4e9 / (n * 4)))  # ~1 s per timing: steady state, not start-up
        rates: dict[str, list[float]] = {name: [] for name, _ in variants}
        for round_ in range(args.pairs + 1):  # the first round warms up
            order = variants if round_ % 2 else variants[::-1]  # alternating: drift hits all alike
            seconds = {name: fn(comm, n, k, live, wire) for name, fn in order}
            if round_:
                for name in rates:
                    rates[name].append(k * workers / seconds[name])
        if comm.rank == 0:
            med = {name: statistics.median(r) for name, r in rates.items()}
            pairs = [("ours", "raw"), ("ours", "raw+upd"), ("raw+upd", "raw")]
            if args.servers > 1:
                pairs += [("ours2", "ours"), ("ours2", "raw+upd")]
            ratios = {(a, b): [x / y for x, y in zip(rates[a], rates[b])] for a, b in pairs}
            cells = [f"{statistics.median(ratios[pair]):>{w}.3f}" for pair, w in zip(pairs, (10, 14, 13, 12, 15))]
            print(f"{n:>12,}{med['ours']:>9.1f}{med['raw']:>9.1f}{med['raw+upd']:>9.1f}" + "".join(cells[:3])
                  + (f"{med['ours2']:>9.1f}" + "".join(cells[3:]) if args.servers > 1 else "")
                  + "   " + " ".join(f"{r:.2f}" for r in ratios["ours", "raw"]), flush=True)


if __name__ == "__main__":
    main()
