"""The cost model (:mod:`mpi_easgd.plan`) against measured runs on this machine.

Each configuration is a real run of the package's own engine: ``AsyncTraining`` (server,
tester, workers) or ``AllReduceSGD`` / ``AllReduceEA``, around a loop whose step is a
sleep of ``step_ms`` (each worker emulates its own accelerator: on 2 shared cores real
compute would measure the cores, not the exchanges) with a model of ``params``
parameters. The optimizer's step is done on the emulated accelerator too (a no-op here),
so a step's time is the sleep plus the engine's own per-step work.

The model is given the calibration measured first, in the same invocation, at each
configuration's model size, and the per-step time each run measured outside its
exchanges. It predicts the exchange rate and the compute utilization, compared here with
what the run reports. Some configurations add an emulated link
(``MPI_EASGD_FAULT=rank=R,action=delay,...`` on every worker: each exchange takes at least
its latency plus its bytes at that rate; :func:`emulated` says how the model sees it). Run::

    python benchmarks/plan_validation.py              # ~3 minutes; a table and plan_validation.csv
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()

# (algo, workers, params, step_ms, tau, link: (latency_ms, mbps) or None, server ranks, workers per group)
CONFIGS = [
    ("easgd", 1, 1_000_000, 10, 4, None, 1, 1),
    ("easgd", 2, 1_000_000, 10, 4, None, 1, 1),
    ("easgd", 3, 1_000_000, 5, 2, None, 1, 1),
    ("easgd", 2, 11_000_000, 20, 4, None, 1, 1),
    ("easgd", 3, 11_000_000, 10, 2, None, 1, 1),
    ("easgd", 2, 1_000_000, 10, 4, (20.0, 0), 1, 1),
    ("easgd", 2, 1_000_000, 10, 4, (5.0, 2000), 1, 1),
    ("downpour", 2, 4_000_000, 10, 4, None, 1, 1),
    ("easgd", 2, 11_000_000, 5, 1, None, 1, 1),  # the server is the bottleneck ...
    ("easgd", 2, 11_000_000, 5, 1, None, 2, 1),  # ... and split over two ranks
    ("easgd", 2, 4_000_000, 10, 4, None, 1, 2),  # one group of two (averaging every 2 steps)
    ("sgd", 2, 4_000_000, 20, 1, None, 1, 1),
    ("sgd", 4, 1_000_000, 10, 1, None, 1, 1),
    ("ea", 2, 11_000_000, 10, 4, None, 1, 1),
    ("ea", 4, 1_000_000, 10, 4, (20.0, 0), 1, 1),
]
GROUP_TAU = 2


def emulated_optimizer(model):
    """The optimizer of a model whose step runs on an emulated accelerator: its step does
    nothing here."""
    import torch

    class OnTheAccelerator(torch.optim.Optimizer):
        def step(self, closure=None):
            return None

    return OnTheAccelerator(model.parameters(), {})


def one_run(args) -> None:
    """A rank of one configuration (under mpiexec); one of them writes the measurement."""
    import numpy as np
    import torch
    from mpi4py import MPI  # (python -m mpi4py has started MPI already)

    import mpi_easgd

    comm = MPI.COMM_WORLD
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(args.params))
    optimizer = emulated_optimizer(model)
    sleep = args.step_ms / 1e3
    out = Path(args.out)
    if args.algo in ("sgd", "ea"):
        from mpi_easgd import AllReduceEA, AllReduceSGD

        sync = AllReduceSGD(comm) if args.algo == "sgd" else AllReduceEA(comm, tau=args.tau, alpha=0.3)
        sync.synchronize_parameters(model)
        model.w.grad = torch.zeros_like(model.w)
        waited = 0.0
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            time.sleep(sleep)
            t1 = time.perf_counter()
            if args.algo == "sgd":
                sync.sum_and_normalize_gradients(model)
            else:
                sync.average_parameters(model)
            waited += time.perf_counter() - t1
        wall = time.perf_counter() - t0
        rows = comm.gather((wall, waited), root=0)
        if comm.rank == 0:
            walls = [r[0] for r in rows]
            rounds = args.steps if args.algo == "sgd" else args.steps // args.tau
            out.write_text(json.dumps(dict(
                exchanges_per_second=rounds / max(walls),
                compute_utilization=float(np.mean([1 - w / t for t, w in rows])),
                step_seconds=float(np.mean([(t - w) / args.steps for t, w in rows])))))
        return
    groups = dict(groups=str(args.group), group_tau=GROUP_TAU) if args.group > 1 else {}
    with mpi_easgd.AsyncTraining(comm, model, optimizer, algo=args.algo, tau=args.tau, alpha=0.3, epochs=1,
                                 servers=args.servers, **groups,
                                 out=str(out.parent / "runs"), run_name=out.stem, test_every=10**9,
                                 progress=False) as run:
        for _ in run.epochs():
            for _ in run.batches(range(args.steps)):
                time.sleep(sleep)
                if not run.step():
                    break
    if run.ctx.topo.logs:  # (the rank that writes the summary)
        summary = json.loads((out.parent / "runs" / out.stem / "summary.json").read_text())
        workers = [w for w in summary["per_worker"] if w.get("wall_seconds")]
        out.write_text(json.dumps(dict(
            exchanges_per_second=sum(w["exchanges"] / w["wall_seconds"] for w in workers),
            compute_utilization=summary["compute_utilization"],
            step_seconds=float(np.mean([(w["wall_seconds"] - w["exchange_wait_seconds"]) / w["steps"]
                                        for w in workers])))))


def emulated(machine, link: tuple[float, float], algo: str, workers: int):
    """The machine as the model sees an emulated link (:mod:`mpi_easgd.runtime.faults`):
    each worker's exchange (async) or round (sync) takes its latency once, plus its bytes
    at the link's rate; the server's own link stays this machine's. The emulation waits
    until that much time has passed, so it is a floor; the model adds it to the real
    transfer, which is small beside it here."""
    seconds, mbps = link[0] / 1e3, link[1]
    rate = mbps * 1e6 / 8 if mbps else machine.bandwidth
    if algo in ("sgd", "ea"):  # a ring has 2 (n - 1) latencies
        return dataclasses.replace(machine, latency=machine.latency + seconds / (2 * (workers - 1)), bandwidth=rate)
    return dataclasses.replace(machine, latency=machine.latency + seconds / 2, bandwidth=rate,
                               server_bandwidth=machine.bandwidth)


def mpiexec() -> str:
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else "mpiexec"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--algo", default="easgd")
    p.add_argument("--params", type=int, default=1_000_000)
    p.add_argument("--step-ms", type=float, default=10.0)
    p.add_argument("--tau", type=int, default=4)
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--group", type=int, default=1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default="")
    p.add_argument("--csv", type=Path, default=Path("plan_validation.csv"))
    p.add_argument("--only", type=int, nargs="*", help="run only these configurations (indices)")
    args = p.parse_args()
    if args.run:
        one_run(args)
        return 0

    from mpi_easgd.plan import Machine, Workload, predict, table, wire_bytes

    tmp = Path(tempfile.mkdtemp(prefix="plan_validation."))
    machines = {}  # params -> the calibration at that size
    for params in sorted({c[2] for i, c in enumerate(CONFIGS) if args.only is None or i in args.only}):
        calib = tmp / f"machine{params}.json"
        subprocess.run([sys.executable, "-m", "mpi_easgd.plan", "--calibrate", str(calib), "--params", str(params)],
                       check=True, timeout=600)
        machines[params] = Machine(**json.loads(calib.read_text()))
    rows = []
    for i, (algo, workers, params, step_ms, tau, link, servers, group) in enumerate(CONFIGS):
        if args.only is not None and i not in args.only:
            continue
        out = tmp / f"run{i}.json"
        ranks = workers + (servers + 1 if algo not in ("sgd", "ea") else 0)
        env = dict(os.environ)
        if link is not None:  # every worker's link (async: ranks 1..W; sync: every rank)
            trainers = range(servers, servers + workers) if ranks > workers else range(workers)
            env["MPI_EASGD_FAULT"] = ";".join(f"rank={r},action=delay,seconds={link[0] / 1e3},mbps={link[1]}"
                                              for r in trainers)
        steps = max(200, 40 * tau)
        cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", str(HERE), "--run", "--algo", algo,
               "--params", str(params), "--step-ms", str(step_ms), "--tau", str(tau), "--steps", str(steps),
               "--servers", str(servers), "--group", str(group),
               "--out", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            return 1
        measured = json.loads(out.read_text())
        m = machines[params]
        if link is not None:  # the emulated link (see the module docstring)
            m = emulated(m, link, algo, workers)
        w = Workload(params=params, step_seconds=measured["step_seconds"], tau=tau, workers=workers,
                     servers=servers, wire_bytes=wire_bytes("float32"), group=group,
                     group_tau=GROUP_TAU if group > 1 else 0)
        pred = predict(algo, w, m)
        rows.append(dict(algo=algo, workers=workers, servers=servers, group=group, params=f"{params / 1e6:g}M",
                         step_ms=step_ms, tau=tau,
                         link="-" if link is None else f"{link[0]:g}ms/{link[1] or 'inf'}Mbps",
                         measured_step_ms=measured["step_seconds"] * 1e3,
                         predicted_x=pred.exchanges_per_second, measured_x=measured["exchanges_per_second"],
                         x_ratio=measured["exchanges_per_second"] / pred.exchanges_per_second,
                         predicted_util=pred.compute_utilization, measured_util=measured["compute_utilization"],
                         util_ratio=measured["compute_utilization"] / pred.compute_utilization,
                         bottleneck=pred.bottleneck))
        print(table(rows[-1:], list(rows[-1])), flush=True)
    for params, machine in machines.items():
        print(f"machine at {params:,} parameters: {json.dumps(dataclasses.asdict(machine))}")
    print(table(rows, list(rows[0])))
    within = sum(0.85 <= r["x_ratio"] <= 1.15 and 0.85 <= r["util_ratio"] <= 1.15 for r in rows)
    print(f"\n{within} of {len(rows)} configurations within +-15% (exchange rate and utilization)")
    with args.csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"written to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
