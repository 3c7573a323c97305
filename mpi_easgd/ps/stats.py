"""The statistics of an async run, one type per role, and the summary made of them.

At the end every worker still in the run sends its :class:`WorkerStats` to the server
(rank 0), which sends the tester its :class:`ServerStats` with all of them in it
(``relayed``); the tester adds its own :class:`TesterStats` and :func:`summarise` writes
the run's summary from them (under ULFM, if the tester died, rank 0 stands in for it).
They travel pickled (the same classes on every rank).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from mpi_easgd.runtime.metrics import goodput, run_summary, traffic_summary


@dataclass
class WorkerStats:
    """A worker's own account of its training."""

    rank: int
    exchanges: int
    steps: int
    samples: int
    wall_seconds: float
    nonfinite_skipped: int
    latency_ms_mean: float  # from each send to its reply landing
    latency_ms_p50: float
    latency_ms_p99: float
    exchange_wait_seconds: float  # blocked on exchanges
    steps_in_flight: int  # local steps taken while an exchange was in flight
    bytes_each_way: tuple[int, int] = (0, 0)  # of one message, of one reply
    audit_checksums: list[float] | None = None  # --audit: what it sent, in order

    @classmethod
    def of(cls, rank: int, exchanges: int, steps: int, samples: int, wall_seconds: float, skipped: int,
           latencies: list[float], waited: float, in_flight: int, bytes_each_way: tuple[int, int],
           checksums: list[float] | None) -> WorkerStats:
        lat = np.asarray(latencies) * 1e3
        return cls(rank, exchanges, steps, samples, wall_seconds, skipped, float(lat.mean()),
                   float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), waited, in_flight,
                   tuple(bytes_each_way), checksums)

    def traffic(self) -> dict:
        """This worker's row for :func:`~mpi_easgd.runtime.metrics.traffic_summary`."""
        return dict(rank=self.rank, bytes_sent=self.exchanges * self.bytes_each_way[0],
                    bytes_received=self.exchanges * self.bytes_each_way[1],
                    exchange_seconds=self.exchange_wait_seconds, train_seconds=self.wall_seconds)

    def row(self) -> dict:
        row = dataclasses.asdict(self)
        del row["bytes_each_way"]
        if self.audit_checksums is None:
            del row["audit_checksums"]
        return row


@dataclass
class ServerStats:
    """The server's account: the center's updates, each worker as the server saw it
    (:meth:`~mpi_easgd.ps.roster.WorkerRecord.row`), checkpoints, losses and replacements."""

    updates: int
    per_worker: list[dict]
    server_wall_seconds: float
    server_busy_fraction: float
    stopped: bool  # a stop signal ended training
    checkpoint: str  # the newest checkpoint
    checkpoints: int
    checkpoint_seconds: float  # from SAVE to commit, summed
    lost_workers: list[int]
    dead_workers: list[int]  # (ULFM) lost because their process died
    replacements: list[dict]  # (respawn) rank, generation, detected, assigned, first_exchange, exchanges_before
    spawn_seconds: list[float]
    relayed: dict[int, WorkerStats] = field(default_factory=dict)  # every worker's statistics, by rank
    shards: list[dict] = field(default_factory=list)  # (--servers S) each other server rank's counters
    takeovers: list[dict] = field(default_factory=list)  # (--servers S, ULFM) the shards rank 0 took over
    tester_replacements: list[dict] = field(default_factory=list)  # (respawn) each new tester process
    lost_at_start: list[int] = field(default_factory=list)  # (ULFM) workers dead in the start, by their first rank


@dataclass
class TesterStats:
    """The tester's final evaluation (a metrics row) and how many it made in all."""

    final: dict
    evaluations: int
    pending: tuple[int, int] | None = None  # (updates, samples) of a final snapshot that came incomplete


def dead_generations(per_worker: list[dict], replacements: list[dict], reported: set[int],
                     tau: int, samples_per_step: int) -> tuple[int, float, int]:
    """The worker processes that ended without a report (dead, or lost, and each one a
    replacement took over from): (the samples of theirs that reached the center, an
    estimate of those lost, how many there were). A process's first exchange brings no
    samples, each later one ``tau`` steps'; what it computed after its last exchange is
    unknown: half an exchange interval, the expectation for a death at a random moment."""
    useful, lost, count = 0, 0.0, 0
    for row in per_worker:
        starts = [0, *sorted(r["exchanges_before"] for r in replacements if r["rank"] == row["rank"])]
        ends = [*starts[1:], row["server_exchanges"]]
        unreported = len(starts) - (row["rank"] in reported and not row.get("lost", False))
        for g in range(unreported):
            useful += max(ends[g] - starts[g] - 1, 0) * tau * samples_per_step
            lost += tau * samples_per_step / 2
            count += 1
    return useful, lost, count


def summarise(cfg, dataset: str, world_size: int, num_workers: int, worker_ranks: list[int], server: ServerStats,
              tester: TesterStats, workers: dict[int, WorkerStats], samples_per_step: int = 0) -> dict:
    """The run's summary (``summary.json``) from every role's statistics; ``samples_per_step``
    of a worker (for the samples of workers that died, in ``goodput``)."""
    workers = {**workers, **{int(rank): stats for rank, stats in server.relayed.items()}}
    lost, dead = server.lost_workers, server.dead_workers
    per_worker = [dict(workers[s["rank"]].row() if s["rank"] in workers else {}, **s,
                       lost=s["rank"] in lost, died=s["rank"] in dead) for s in server.per_worker]
    traffic = {rank: w.traffic() for rank, w in workers.items()}
    each_way = next(iter(workers.values())).bytes_each_way if workers else (0, 0)
    account = traffic_summary(list(traffic.values()), each_way, "exchange")  # (adds each one's utilization)
    for row in per_worker:
        if row["rank"] in traffic:
            row.update({k: traffic[row["rank"]][k] for k in ("bytes_sent", "bytes_received", "compute_utilization")})
    worker_ranks = [*worker_ranks, *(s["rank"] for s in server.per_worker if s.get("joined"))]  # (late joiners)
    present = [workers[r] for r in worker_ranks if r not in lost and r in workers]
    samples = sum(w.samples for w in present)
    dead_useful, dead_lost, deaths = dead_generations(per_worker, server.replacements,
                                                      {r for r in worker_ranks if r in workers}, cfg.tau,
                                                      samples_per_step or cfg.batch_size)
    seconds = max((w.wall_seconds for w in present), default=0.0)
    return run_summary(
        cfg, dataset, world_size, num_workers, test=tester.final, train_samples=samples, train_seconds=seconds,
        exchanging=len(server.per_worker),  # (--groups: one per group)
        nonfinite_skipped=sum(w.nonfinite_skipped for w in present),
        evaluations=tester.evaluations, exchanges=server.updates,
        server_busy_fraction=server.server_busy_fraction, per_worker=per_worker,
        checkpoints=server.checkpoints, checkpoint_seconds=server.checkpoint_seconds, lost_workers=lost,
        dead_workers=dead,  # (ULFM) lost because their process died: gone, unlike a hung one
        replacements=[dict(r, seconds_to_first_exchange=r["first_exchange"] - r["detected"]
                           if r["first_exchange"] else None) for r in server.replacements],
        spawn_seconds=server.spawn_seconds, server_seconds=server.server_wall_seconds,
        final_metrics={k: v for k, v in tester.final.items() if k not in ("epoch", "step", "samples", "wall_time")},
        damped_exchanges=sum(s.get("damped", 0) for s in server.per_worker),  # (--max-staleness)
        **goodput(samples + dead_useful, dead_lost, deaths),
        **({"shard_servers": [dict(rank=0, updates=server.updates,
                                   busy_seconds=server.server_busy_fraction * server.server_wall_seconds),
                              *server.shards]} if server.shards else {}),
        **({"server_takeovers": server.takeovers} if server.takeovers else {}),
        **({"tester_replacements": server.tester_replacements} if server.tester_replacements else {}),
        **({"lost_at_start": server.lost_at_start} if server.lost_at_start else {}),
        **account,
    )
