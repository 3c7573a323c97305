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
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from mpi4py import MPI

from mpi_easgd.flat import flat_buffer
from mpi_easgd.ps.protocol import META_LEN, Command, Kind, Tag, WorkerEndpoint, wait_politely
from mpi_easgd.ps.server import Server
from mpi_easgd.rules.asynchronous import server_rule
from mpi_easgd.transfer import EXCHANGE_DTYPES, exchange_dtype, mpi_view

RAW = 99


def ours(comm, n: int, exchanges: int, live, wire: torch.dtype = torch.float32) -> float:
    rank, size = comm.rank, comm.size
    workers, tester = list(range(1, size - 1)), size - 1
    buf = flat_buffer(n)
    message, reply = (mpi_view(wire_buffer(n, wire)) for _ in range(2))
    comm.Barrier()
    start = time.perf_counter()
    if rank == 0:
        Server(comm, live, flat_buffer(n), server_rule("easgd", 0.3), workers, tester, test_every=1e9,
               samples_per_exchange=1, save=lambda step, extra, written: None, wire=wire).run()  # no files
    elif rank == tester:  # takes snapshots until the final one, like the real tester
        meta = np.zeros(META_LEN, np.int64)
        while meta[0] != Kind.FINAL:
            wait_politely([comm.Irecv(meta, source=0, tag=Tag.SNAPSHOT_META)])  # as the real tester waits
            comm.Recv(buf.numpy(), source=0, tag=Tag.SNAPSHOT)
    else:  # a worker that only exchanges, through the workers' own endpoint
        endpoint = WorkerEndpoint(comm, live, 0)
        for _ in range(exchanges):
            endpoint.exchange(message, reply)
        endpoint.done(exchanges, 0, 0, False)
        while endpoint.inbox.wait()[0] != Command.END:  # the final checkpoint: nothing to save
            endpoint.saved(0)
    wait_politely([comm.Ibarrier()])  # ranks that finished first leave the CPU to those still at work
    return time.perf_counter() - start


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
        for _ in range(exchanges * (size - 2)):
            comm.Recv(buf.numpy(), source=MPI.ANY_SOURCE, tag=RAW, status=status)
            if update:  # the new center over the message, the old one goes back
                torch.lerp(reply, buf, 0.3, out=buf)
                buf, reply = reply, buf
            comm.Send((reply if update else buf).numpy(), dest=status.Get_source(), tag=RAW)
    elif rank != size - 1:
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
    args = parser.parse_args()
    wire = exchange_dtype(args.exchange_dtype)
    comm = MPI.COMM_WORLD
    if comm.size < 3:
        raise SystemExit("run with 4+ ranks: server, workers, tester")
    workers = comm.size - 2
    live = comm.Dup()  # the server's liveness traffic
    if comm.rank == 0:
        print(f"{workers} workers; exchanges/s over all workers and each ratio: median of {args.pairs} rounds; "
              f"ours exchanges {args.exchange_dtype}, raw float32")
        print(f"{'parameters':>12}{'ours':>9}{'raw':>9}{'raw+upd':>9}{'ours/raw':>10}{'ours/raw+upd':>14}"
              f"{'raw+upd/raw':>13}   ours/raw per round")
    variants = [("ours", ours), ("raw", raw), ("raw+upd", raw_update)]
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
            ratios = {(a, b): [x / y for x, y in zip(rates[a], rates[b])]
                      for a, b in [("ours", "raw"), ("ours", "raw+upd"), ("raw+upd", "raw")]}
            print(f"{n:>12,}{med['ours']:>9.1f}{med['raw']:>9.1f}{med['raw+upd']:>9.1f}"
                  + "".join(f"{statistics.median(r):>{w}.3f}" for r, w in zip(ratios.values(), (10, 14, 13)))
                  + "   " + " ".join(f"{r:.2f}" for r in ratios["ours", "raw"]), flush=True)


if __name__ == "__main__":
    main()
