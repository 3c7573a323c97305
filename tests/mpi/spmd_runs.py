"""Whole training runs, several in one job: each through ``mpi_easgd.train.run`` (the
command line's own function) on a sub-communicator of the first N ranks, so that a run
costs no process launch. Run with 5 ranks; ranks outside a run's communicator wait.

Every audited async run checks: every worker's exchange count is what its steps imply and
what the server counted (nothing lost); replaying the server's log of arrivals through the
pure update rule reproduces the final center bitwise (nothing applied twice or skipped);
the payloads the server logged per worker are, in order, what that worker sent.
"""

from __future__ import annotations

import collections
import csv
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from comm import one_side_fails_all
from conftest import make_blobs, read_summary
from mpi4py import MPI

from mpi_easgd import compress
from mpi_easgd.rules.audit import replay
from mpi_easgd.train import run
from mpi_easgd.transfer import exchange_dtype

WORLD = MPI.COMM_WORLD
pytestmark = pytest.mark.skipif(WORLD.Get_size() != 5, reason="runs of 2 to 5 ranks: 5 ranks")


@pytest.fixture(scope="module")
def shared():
    """A folder every rank sees (rank 0's temporary folder) with a small dataset in it."""
    folder = WORLD.bcast(tempfile.mkdtemp() if WORLD.rank == 0 else None)
    if WORLD.rank == 0:
        make_blobs(Path(folder) / "blobs.h5")
    WORLD.Barrier()
    yield Path(folder)
    WORLD.Barrier()
    if WORLD.rank == 0:
        shutil.rmtree(folder)


def train(ranks: int, *flags: str, capsys=None, stderr: bool = False) -> tuple[int | None, str]:
    """``mpiexec -n ranks python -m mpi_easgd.train --no-progress FLAGS`` on the first
    ``ranks`` ranks: (exit status, what every rank of the run printed to stdout, or to
    stderr), on the run's rank 0; (None, "") elsewhere."""
    comm = WORLD.Split(0 if WORLD.rank < ranks else MPI.UNDEFINED, WORLD.rank)
    status, out = None, ""
    if comm != MPI.COMM_NULL:
        status = run(["--no-progress", *flags], comm)
        printed = capsys.readouterr() if capsys else None
        printed = comm.gather((printed.err if stderr else printed.out) if printed else "")
        out = "".join(printed) if comm.rank == 0 else ""
        comm.Free()
    idle_barrier()
    return (status, out) if WORLD.rank == 0 else (None, "")


def idle_barrier() -> None:
    """``WORLD.Barrier()`` that sleeps while it waits: MPICH's blocking calls poll a core at
    full speed, and the ranks left out of a run would take CPU time from the run's ranks
    (5 processes on the test machine's 2 cores)."""
    request = WORLD.Ibarrier()
    while not request.Test():
        time.sleep(0.002)


def check_audit(run, summary, tau):
    audit = np.load(run / "audit.npz")
    workers = summary["per_worker"]
    for w in workers:
        assert w["exchanges"] == math.ceil(w["steps"] / tau) + 1  # every tau steps + the flush
        assert w["server_exchanges"] == w["exchanges"] == w["reported_exchanges"]
    assert summary["exchanges"] == sum(w["exchanges"] for w in workers) == len(audit["order"])
    center, final = replay(run / "audit.npz")
    assert torch.equal(center, final), "replay differs from the center"
    for i, w in enumerate(workers):
        received = audit["payloads"][audit["order"] == i].astype(np.float64).sum(axis=1)
        np.testing.assert_allclose(received, w["audit_checksums"], rtol=1e-9)
    saved = torch.load(run / "center.pt")  # lenet: parameters only, no buffers
    flat = torch.cat([v.reshape(-1) for v in saved.values()])
    assert torch.equal(flat, torch.from_numpy(audit["final"])), "center.pt is not the final center"


@pytest.mark.parametrize("algo,ranks,tau,wire,overlap", [
    ("easgd", 4, 4, "topk", True), ("eamsgd", 5, 8, "float16", False),
    ("downpour", 4, 4, "int8", True), ("async-diloco", 5, 4, "int4", False)])
@one_side_fails_all
def test_async_run_learns_and_loses_no_update(algo, ranks, tau, wire, overlap, shared, capsys, monkeypatch):
    """Overlapped runs (--overlap-exchange) get an emulated 15 ms network round trip, so that
    every reply lands while the worker steps: the audit then shows that each message was the
    snapshot taken at its send, and that the center is still exactly what was applied."""
    out = shared / f"async-{algo}"
    if overlap:
        monkeypatch.setenv("MPI_EASGD_FAULT", ";".join(f"rank={r},action=delay,seconds=0.015"
                                                       for r in range(1, ranks - 1)))
    bounded = algo == "async-diloco"  # (3 workers: stale exchanges, damped beyond 1 by --max-staleness; a quorum)
    # top-k at the default 2% learns easgd too slowly for 3 epochs (0.81-0.85 here): 10%
    fraction = 0.1 if wire == "topk" else compress.TOPK_FRACTION
    status, stdout = train(ranks, "--algo", algo, "--epochs", "3", "--tau", str(tau), "--audit", "--test-every",
                           "0.5", "--exchange-dtype", wire, "--out", str(out), "--run-name", "run",
                           *(["--overlap-exchange"] if overlap else []),
                           *(["--topk-fraction", str(fraction)] if wire == "topk" else []),
                           *(["--max-staleness", "1", "--outer-quorum", "0.67"] if bounded else []), capsys=capsys)
    if WORLD.rank:
        return
    assert status == 0
    summary = read_summary(out / "run")
    assert summary["workers"] == ranks - 2
    if algo == "async-diloco":  # (a momentum step once 2 of its 3 workers pushed, or the grace window passed)
        assert (summary["outer_lr"], summary["outer_momentum"], summary["outer_delay"]) == (0.7, 0.9, ranks - 2)
        assert summary["outer_quorum"] == 0.67
    else:
        assert summary["beta"] == pytest.approx(summary["alpha"] * (ranks - 2))
    assert summary["test_accuracy"] > 0.8, "mnist5k must be learnt well above chance (0.1)"
    assert summary["overlap_exchange"] is overlap
    for w in summary["per_worker"]:
        assert w["latency_ms_p50"] <= w["latency_ms_p99"]
        assert w["staleness_mean"] >= 0
        if overlap:  # every exchange but the final flush had a step taken while it travelled
            assert w["steps_in_flight"] >= w["exchanges"] - 1 and w["latency_ms_p50"] >= 15
        else:
            assert w["steps_in_flight"] == 0
    assert 0 < summary["server_busy_fraction"] < 1
    check_audit(out / "run", summary, tau)  # (the replay damps as the run did)
    stale = np.load(out / "run" / "audit.npz")["staleness"]
    assert summary["damped_exchanges"] == (int((stale > 1).sum()) if bounded else 0)
    assert sum(w["damped"] for w in summary["per_worker"]) == summary["damped_exchanges"]
    if bounded:
        assert summary["max_staleness"] == 1 and summary["damped_exchanges"] > 0, "3 workers: some are stale"
    payloads = torch.from_numpy(np.load(out / "run" / "audit.npz")["payloads"])
    codec = compress.codec(wire, fraction)
    if codec is None:
        assert torch.equal(payloads.to(exchange_dtype(wire)).float(), payloads), f"every message travelled as {wire}"
        size = payloads.shape[1] * exchange_dtype(wire).itemsize
    else:
        size = codec.nbytes(payloads.shape[1])
    assert summary["exchange_dtype"] == wire and summary["transfer"] == "direct (CPU)"
    assert summary["bytes_sent_per_exchange"] == summary["bytes_received_per_exchange"] == size
    for w in summary["per_worker"]:
        assert w["bytes_sent"] == w["exchanges"] * size and 0 < w["compute_utilization"] <= 1
    rows = (out / "run" / "metrics.csv").read_text().splitlines()
    assert all(float(row.split(",")[4]) > 0 for row in rows[1:]), "every row has the center's train_loss"
    assert "run summary" in stdout and "latency_ms_p99" in stdout


@one_side_fails_all
def test_a_users_rule_runs_with_checkpoints_overlap_and_the_audit(shared, capsys, monkeypatch):
    """A rule defined in a user's file (tests/mpi/user_rules.py: staleness-aware elastic
    averaging), named on the command line, with three workers (so that exchanges are
    stale), overlapped exchanges over an emulated 15 ms round trip, periodic checkpoints
    and the audit: it learns, its state is checkpointed, and the replay is bit for bit."""
    out, tau = shared / "user-rule", 4
    monkeypatch.setenv("MPI_EASGD_FAULT", ";".join(f"rank={r},action=delay,seconds=0.015" for r in (1, 2, 3)))
    rule = "user_rules:StalenessAwareEASGD"
    status, _ = train(5, "--algo", rule, "--epochs", "3", "--tau", str(tau), "--audit", "--overlap-exchange",
                      "--checkpoint-every", "30", "--test-every", "0.5", "--out", str(out), "--run-name", "run",
                      capsys=capsys)
    if WORLD.rank:
        return
    assert status == 0
    summary = read_summary(out / "run")
    assert summary["algo"] == rule and summary["beta"] == pytest.approx(summary["alpha"] * 3)
    assert summary["test_accuracy"] > 0.5 and summary["checkpoints"] >= 2  # chance: 0.1 (damped pulls learn slower)
    check_audit(out / "run", summary, tau)
    audit = np.load(out / "run" / "audit.npz")
    assert (audit["staleness"] > 0).any() and (np.diff(audit["versions"]) == 1).all()
    from mpi_easgd.runtime import checkpoint

    state = checkpoint.load_rank(checkpoint.latest(out / "run"), 0)["rule"]
    assert state["damped"] == int((audit["staleness"] > 0).sum()), "the rule's own state is checkpointed"


def check_shards(run, summary, servers, since=0):
    """Every shard's audit replays bit for bit, each worker's logged payloads add up, over
    the shards, to what it sent, and center.pt is the shards' finals end to end (``since``:
    the updates before this segment, which its logs do not hold)."""
    audits = [np.load(run / f"audit-shard{k}.npz") for k in range(servers)]
    for k, audit in enumerate(audits):
        assert len(audit["order"]) == summary["exchanges"] - since, "every exchange reached every shard"
        center, final = replay(run / f"audit-shard{k}.npz")
        assert torch.equal(center, final), f"shard {k}'s replay differs from its center"
    for i, w in enumerate(summary["per_worker"]):
        received = sum(a["payloads"][a["order"] == i].astype(np.float64).sum(axis=1) for a in audits)
        np.testing.assert_allclose(received, w["audit_checksums"], rtol=1e-6)
    saved = torch.load(run / "center.pt")
    flat = torch.cat([v.reshape(-1) for v in saved.values()])
    assert torch.equal(flat, torch.cat([torch.from_numpy(a["final"]) for a in audits])), "center.pt is not whole"
    assert [s["updates"] for s in summary["shard_servers"]] == [summary["exchanges"]] * servers


@one_side_fails_all
def test_a_center_split_over_two_servers_replays_each_shard_and_resumes(shared, capsys, monkeypatch):
    """--servers 2 (ranks 0 and 1 each hold half of the center; 2 workers; the tester):
    DOWNPOUR in int4 (each shard its own compressed channel, the residual in the workers'
    checkpoints), overlapped over an emulated 15 ms round trip, periodic checkpoints; then
    resumed for one more epoch. Each segment's shard audits replay bit for bit: the resumed
    servers start from their own shards, and the workers from the whole center."""
    out, tau = shared / "sharded", 4
    monkeypatch.setenv("MPI_EASGD_FAULT", ";".join(f"rank={r},action=delay,seconds=0.015" for r in (2, 3)))
    flags = ("--algo", "downpour", "--servers", "2", "--tau", str(tau), "--audit", "--overlap-exchange",
             "--exchange-dtype", "int4", "--checkpoint-every", "20", "--out", str(out), "--run-name", "run")
    status, stdout = train(5, *flags, "--epochs", "3", capsys=capsys)
    if WORLD.rank == 0:
        assert status == 0 and "server ranks 0-1 (a shard of the center each)" in stdout, stdout
        summary = read_summary(out / "run")
        assert summary["servers"] == 2 and summary["workers"] == 2 and summary["checkpoints"] >= 3
        assert summary["test_accuracy"] > 0.85, summary["test_accuracy"]
        check_shards(out / "run", summary, 2)
        for w in summary["per_worker"]:
            assert w["server_exchanges"] == w["exchanges"] == math.ceil(w["steps"] / tau) + 1
    before = summary["exchanges"] if WORLD.rank == 0 else 0
    status, stdout = train(5, *flags, "--epochs", "4", "--resume", "auto", capsys=capsys)
    if WORLD.rank == 0:
        assert status == 0 and "resumed from" in stdout, stdout
        summary = read_summary(out / "run")
        assert summary["epochs"] == 4 and summary["test_accuracy"] > 0.85
        check_shards(out / "run", summary, 2, since=before)  # (the resumed segment's own logs)


@one_side_fails_all
def test_workers_in_groups_exchange_through_their_leaders_and_resume(shared, capsys):
    """--groups 2 (3 workers: a pair and one alone): every 2 steps a group averages, every
    tau = 4 its leader exchanges for it and shares the result. Only leaders reach the
    server (the audit replays); every worker's samples count; a resumed run's members start
    from their leader (their checkpoint files are not needed). (--groups node: the groups
    are made in tests/mpi/spmd_collectives.py.)"""
    groups, leaders, out, tau = "2", [1, 3], shared / "groups", 4
    flags = ("--algo", "easgd", "--groups", groups, "--group-tau", "2", "--tau", str(tau), "--audit",
             "--checkpoint-every", "20", "--out", str(out), "--run-name", "run")
    status, stdout = train(5, *flags, "--epochs", "3", capsys=capsys)
    if WORLD.rank == 0:
        assert status == 0 and f"3 workers in {len(leaders)} groups (--groups {groups}" in stdout, stdout
        summary = read_summary(out / "run")
        assert summary["workers"] == 3 and summary["groups"] == groups and summary["group_tau"] == 2
        assert [w["rank"] for w in summary["per_worker"]] == leaders, "only leaders exchange"
        assert summary["beta"] == pytest.approx(summary["alpha"] * len(leaders))
        each = (4000 // 3) // 32 * 32  # mnist5k's 4000 training images, 3 even shards, batch 32
        assert summary["train_samples"] == 3 * 3 * each, "every worker's samples count (3 epochs)"
        assert summary["test_accuracy"] > 0.8, summary["test_accuracy"]
        check_audit(out / "run", summary, tau)
    status, stdout = train(5, *flags, "--epochs", "4", "--resume", "auto", capsys=capsys)
    if WORLD.rank == 0:
        assert status == 0 and "resumed from" in stdout, stdout
        assert read_summary(out / "run")["test_accuracy"] > 0.8


SUMMARY_KEYS = {"algo", "world_size", "workers", "epochs", "test_accuracy", "test_loss",
                "wall_seconds", "train_samples_per_second"}


STREAMING = ("--tau", "4", "--fragments", "2", "--overlap-steps", "1", "--mixing", "0.5")


@pytest.mark.parametrize("algo", ["sgd", "ea", "diloco"])
@one_side_fails_all
def test_sync_run_writes_a_complete_run_directory(algo, shared, capsys):
    """sgd; ea with int4 rounds; diloco streaming (2 fragments, rounds overlapping a step) in int8."""
    out = shared / f"sync-{algo}"
    wire = {"sgd": "float32", "ea": "int4", "diloco": "int8"}[algo]
    status, stdout = train(2, "--algo", algo, "--dataset", str(shared / "blobs.h5"), "--model", "mlp", "--epochs",
                           "3", "--batch-size", "16", "--tau", "2", "--exchange-dtype", wire, "--out", str(out),
                           "--run-name", "run", *(STREAMING if algo == "diloco" else ()), capsys=capsys)
    if WORLD.rank:
        return
    assert status == 0
    run_dir = out / "run"
    summary = read_summary(run_dir)
    assert SUMMARY_KEYS <= summary.keys()
    assert (summary["algo"], summary["world_size"], summary["epochs"]) == (algo, 2, 3)
    assert summary["test_accuracy"] > 0.6, "4 well-separated classes must be learnt"
    assert summary["transfer"] == "direct (CPU)"
    ranks = summary["per_rank"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(0 < r["compute_utilization"] <= 1 for r in ranks)
    if algo != "sgd":  # a gathered round: each rank gets both messages back
        assert summary["bytes_received_per_round"] == 2 * summary["bytes_sent_per_round"]
    if algo == "ea":
        assert all(r["bytes_sent"] == summary["rounds"] * summary["bytes_sent_per_round"] for r in ranks)
    if algo == "diloco":
        assert (summary["fragments"], summary["overlap_steps"], summary["mixing"]) == (2, 1, 0.5)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2, 3]  # 0: the model before the first step
    assert int(rows[0]["samples"]) == 0 and float(rows[0]["train_loss"]) > float(rows[-1]["train_loss"])
    assert int(rows[-1]["samples"]) == 3 * 2 * (256 // 16) * 16
    assert 'algo = "' + algo + '"' in (run_dir / "config.toml").read_text()
    assert f'exchange_dtype = "{wire}"' in (run_dir / "config.toml").read_text()
    from mpi_easgd.models import build_model

    final = torch.load(run_dir / "model.pt", weights_only=True)  # the evaluated model (ea: the center)
    build_model("mlp", (1, 8, 8), 4).load_state_dict(final)
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    state = torch.load(ckpt / "rank-00000.pt", weights_only=True)
    if algo == "sgd":
        assert all(torch.equal(final[k], state["model"][k]) for k in final)
    assert f"run directory: {run_dir}" in stdout
    assert stdout.count("run summary") == 1, "only one rank prints"


@one_side_fails_all
def test_uneven_shards_run_to_the_end(shared):
    if WORLD.rank == 0:
        make_blobs(shared / "odd.h5", n_train=61, n_test=20)
    WORLD.Barrier()
    status, _ = train(3, "--algo", "sgd", "--dataset", str(shared / "odd.h5"), "--model", "mlp", "--uneven",
                      "--batch-size", "10", "--epochs", "2", "--out", str(shared), "--run-name", "u")
    if WORLD.rank == 0:
        assert status == 0
        assert read_summary(shared / "u")["train_samples"] == 2 * 61  # shards 20/20/21, all used


def tree(run_dir):
    """Every file of a run directory with its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("algo,ranks", [("sgd", 2), ("easgd", 3)])
@one_side_fails_all
def test_resuming_a_finished_run_leaves_it_exactly_as_it_was(algo, ranks, shared, capsys):
    """What every SLURM requeue or resubmission does (--resume auto): a finished run says
    so in one line and exits 0, and not one byte of it changes. More --epochs train on."""
    out = shared / f"done-{algo}"
    args = ["--algo", algo, "--dataset", str(shared / "blobs.h5"), "--model", "mlp", "--batch-size", "16",
            "--momentum", "0.9", "--tau", "3", "--out", str(out), "--run-name", "done",
            "--epochs", "2", "--resume", "auto", "--test-every", "0.2"]
    status, _ = train(ranks, *args, capsys=capsys)
    assert WORLD.rank or status == 0
    before = tree(out / "done") if WORLD.rank == 0 else None
    status, stdout = train(ranks, *args, capsys=capsys)
    if WORLD.rank == 0:
        assert status == 0
        assert stdout.count("already finished its 2 epochs; nothing to do") == 1, stdout
        assert tree(out / "done") == before, "a finished run must stay exactly as it was"
    if algo == "sgd":  # training on with more epochs: the same path for every algorithm
        status, stdout = train(ranks, *args[:-4], "--epochs", "3", "--resume", "auto", capsys=capsys)
        if WORLD.rank == 0:
            assert status == 0 and "resumed from" in stdout, stdout
            summary = read_summary(out / "done")
            assert summary["epochs"] == 3 and summary["test_accuracy"] > 0.5


@one_side_fails_all
def test_a_diverged_async_run_says_so(shared, capsys):
    """Nearly every step non-finite (a learning rate far too large): the run still ends, but
    says that it diverged, and the summary keeps the warning."""
    out = shared / "diverged"
    status, stderr = train(3, "--algo", "easgd", "--dataset", str(shared / "blobs.h5"), "--model", "mlp",
                           "--batch-size", "16", "--momentum", "0.9", "--tau", "3", "--out", str(out),
                           "--run-name", "nan", "--epochs", "1", "--lr", "1e12", "--test-every", "0.2",
                           capsys=capsys, stderr=True)
    if WORLD.rank:
        return
    assert status == 0
    assert stderr.count("mpi_easgd: warning: the run diverged:") == 1, stderr
    summary = read_summary(out / "nan")
    assert summary["nonfinite_skipped"] > 0.5 * sum(w["steps"] for w in summary["per_worker"])
    assert any("the run diverged" in w for w in summary["warnings"])


@one_side_fails_all
def test_diloco_reaches_095_on_mnist5k_with_its_defaults(shared, capsys):
    """--algo diloco as documented (tau 10, outer SGD lr 0.7 with Nesterov momentum 0.9,
    inner SGD lr 0.1), 4 ranks: 31 steps per epoch, so 4 outer rounds per epoch (the last
    one for the step after the third period)."""
    out = shared / "diloco"
    status, _ = train(4, "--algo", "diloco", "--epochs", "6", "--out", str(out), "--run-name", "run", capsys=capsys)
    if WORLD.rank:
        return
    assert status == 0
    summary = read_summary(out / "run")
    assert summary["test_accuracy"] >= 0.95, summary["test_accuracy"]
    assert (summary["tau"], summary["outer_lr"], summary["outer_momentum"]) == (10, 0.7, 0.9)
    assert summary["rounds"] == 6 * 4 and "alpha" not in summary


@one_side_fails_all
def test_adamw_as_the_local_optimizer(shared, capsys):
    out = shared / "adamw"
    status, _ = train(2, "--algo", "sgd", "--optimizer", "adamw", "--dataset", str(shared / "blobs.h5"), "--model",
                      "mlp", "--epochs", "3", "--batch-size", "16", "--out", str(out), "--run-name", "run",
                      capsys=capsys)
    if WORLD.rank:
        return
    assert status == 0
    summary = read_summary(out / "run")
    assert (summary["optimizer"], summary["lr"]) == ("adamw", 0.001) and summary["test_accuracy"] > 0.6
    ckpt = sorted((out / "run" / "checkpoints").glob("step-*"))[-1]
    state = torch.load(ckpt / "rank-00000.pt", weights_only=True)["optimizer"]["state"]
    assert "exp_avg" in state[0], "the checkpoint holds AdamW's moments"


def api_run(ranks: int, out: Path, dataset: Path, momentum: float = 0.0, **settings) -> None:
    """A user's script (tests/mpi/api_script.py) on the first ``ranks`` ranks: the command
    line's model, data and optimizer (SGD, lr 0.1; Nesterov with momentum, as for eamsgd),
    in a loop of its own."""
    from api_script import train as script

    comm = WORLD.Split(0 if WORLD.rank < ranks else MPI.UNDEFINED, WORLD.rank)
    if comm != MPI.COMM_NULL:
        script(comm, str(dataset), "mlp", lr=0.1, momentum=momentum, out=str(out), run_name="run", **settings)
        comm.Free()
    idle_barrier()


@pytest.mark.parametrize("algo,momentum", [("easgd", 0.0), ("eamsgd", 0.9), ("downpour", 0.0),
                                            ("async-diloco", 0.0)])
@one_side_fails_all
def test_the_api_and_the_command_line_end_with_the_same_center(algo, momentum, shared, capsys):
    """One worker (so that the exchanges' order is fixed): the same run through the command
    line and through AsyncTraining in a loop of one's own ends with the same center, bit
    for bit, and both audits replay; for every built-in algorithm."""
    flags = dict(algo=algo, tau=3, epochs=2, audit=True, test_every=1.0)
    cli, api = shared / f"same-cli-{algo}", shared / f"same-api-{algo}"
    status, _ = train(3, *[f"--{k.replace('_', '-')}={v}" if v is not True else f"--{k}" for k, v in flags.items()],
                      "--model", "mlp", "--dataset", str(shared / "blobs.h5"), "--lr", "0.1",
                      "--momentum", str(momentum), "--out", str(cli), "--run-name", "run", capsys=capsys)
    api_run(3, api, shared / "blobs.h5", momentum=momentum, **flags)
    if WORLD.rank:
        return
    assert status == 0
    cli_center, api_center = (torch.load(d / "run" / "center.pt") for d in (cli, api))
    assert all(torch.equal(cli_center[k], api_center[k]) for k in cli_center), "the API and the CLI differ"
    for d in (cli, api):
        center, final = replay(d / "run" / "audit.npz")
        assert torch.equal(center, final)
    assert read_summary(api / "run")["exchanges"] == read_summary(cli / "run")["exchanges"]
    assert read_summary(api / "run")["transfer"] == read_summary(cli / "run")["transfer"] == "direct (CPU)"


@pytest.mark.parametrize("algo", ["easgd", "async-diloco", "user_rules:StalenessAwareEASGD"])
@one_side_fails_all
def test_the_api_trains_a_users_loop_with_each_rule(algo, shared, capsys):
    """Four ranks (two workers), a loop of one's own; the tester's metric is the user's."""
    out = shared / f"api-{algo.replace(':', '-')}"
    api_run(4, out, shared / "blobs.h5", algo=algo, tau=4, epochs=3, test_every=0.5, audit=True)
    if WORLD.rank:
        return
    summary = read_summary(out / "run")
    assert summary["algo"] == algo and summary["workers"] == 2
    assert summary["final_metrics"]["test_accuracy"] > 0.8, "the blobs are learnt (chance: 0.25)"
    assert summary["exchanges"] == sum(w["exchanges"] for w in summary["per_worker"])
    center, final = replay(out / "run" / "audit.npz")
    assert torch.equal(center, final)
    rows = list(csv.DictReader((out / "run" / "metrics.csv").open()))
    assert rows and set(rows[0]) >= {"wall_time", "step", "samples", "epoch", "test_accuracy", "test_loss"}


@one_side_fails_all
def test_a_scripts_run_resumes_at_another_size(shared, capsys):
    """A user's loop around AsyncTraining, checkpointed with two workers, resumed with
    three: its workers start from the center at the epoch the old ones were in (the loop
    reads its own data, so that epoch is taken again) and the center trains on."""
    out = shared / "api-resize"
    api_run(4, out, shared / "blobs.h5", algo="easgd", tau=4, epochs=2, test_every=1.0)
    api_run(5, out, shared / "blobs.h5", algo="easgd", tau=4, epochs=3, test_every=1.0, resume="auto")
    said = WORLD.gather("".join(capsys.readouterr()))  # (the tester logs)
    if WORLD.rank:
        return
    said = "".join(said)
    assert "written by 4 ranks: each worker starts from the center, at the start of the epoch" in said, said
    summary = read_summary(out / "run")
    assert summary["world_size"] == 5 and summary["workers"] == 3, summary
    assert summary["final_metrics"]["test_accuracy"] > 0.8, "the blobs are learnt (chance: 0.25)"
    assert [w["samples"] > 0 for w in summary["per_worker"]] == [True] * 3


@pytest.mark.parametrize("algo,dataset,task,model,epochs,tau", [
    ("easgd", "user_data:regression", "regression", "user_data:regression_mlp", 4, 4),
    ("async-diloco", "user_data:tiny_corpus", "next-token", "charlm", 8, 10),  # (tau 4: the outer momentum overshoots)
    ("user_rules:StalenessAwareEASGD", "user_data:regression", "regression", "user_data:regression_mlp", 4, 4),
])
@one_side_fails_all
def test_an_async_run_on_a_users_datasets(algo, dataset, task, model, epochs, tau, shared, capsys):
    """A dataset factory, a task and a model defined only in a test file (user_data.py), and
    a rule too (user_rules.py), from the command line: uneven shards, periodic checkpoints and the audit as with HDF5;
    the tester reports the task's metrics."""
    out = shared / f"user-data-{algo}"
    status, _ = train(4, "--algo", algo, "--dataset", dataset, "--task", task, "--model", model,
                      "--epochs", str(epochs), "--tau", str(tau), "--batch-size", "16", "--optimizer", "adamw",
                      "--lr", "0.003", "--uneven", "--checkpoint-every", "25", "--audit", "--test-every", "0.5",
                      "--out", str(out), "--run-name", "run", capsys=capsys)
    if WORLD.rank:
        return
    assert status == 0
    summary = read_summary(out / "run")
    assert summary["checkpoints"] >= 2 and summary["dataset"] == dataset
    for w in summary["per_worker"]:
        assert w["exchanges"] == w["server_exchanges"] == w["reported_exchanges"]
    center, final = replay(out / "run" / "audit.npz")
    assert torch.equal(center, final)
    last = list(csv.DictReader((out / "run" / "metrics.csv").open()))[-1]
    if task == "regression":
        assert float(last["test_rmse"]) ** 2 < 0.5 * 0.566, last  # the test targets' variance: 0.566
    else:
        unigram = 2.185  # nats per byte of predicting the test bytes' frequencies
        assert float(last["test_loss"]) < 0.5 * unigram, last


@pytest.mark.parametrize(("algo", "old", "new", "keep"), [("ea", 4, 3, True), ("sgd", 3, 5, False),
                                                          ("diloco", 5, 2, False)])
@one_side_fails_all
def test_a_run_resumed_at_another_size_trains_on_each_sample_of_its_epoch_once(algo, old, new, keep, shared, capsys):
    """A checkpoint in the middle of the only epoch, written by ``old`` ranks, resumed on
    ``new``: counted by the dataset itself (what each process read for training), the
    samples taken before the checkpoint and after the resume are, each once, those that
    the old ranks took in their whole epoch. ``keep``: --keep-global-batch, each new rank
    taking 64 / 3 = 21 samples per step (in micro-batches of 16 and 5)."""
    import user_data

    n, batch = 1024, 16
    out, stop = shared / f"resize-{algo}", (n // old) // batch // 2 + 1  # (kept: this checkpoint and the last)
    flags = ["--algo", algo, "--dataset", "user_data:counted_regression", "--task", "regression", "--model",
             "user_data:counting_mlp", "--epochs", "1", "--batch-size", str(batch), "--prefetch", "0",
             "--out", str(out), "--run-name", "run", "--tau", "2", *(["--keep-global-batch"] if keep else [])]
    taken = []
    for ranks, extra in ((old, ["--checkpoint-every", str(stop)]),
                         (new, ["--resume", str(out / "run" / "checkpoints" / f"step-{stop:09d}")])):
        status, stdout = train(ranks, *flags, *extra, capsys=capsys)
        assert WORLD.rank or status == 0, stdout
        taken.append(WORLD.gather(list(user_data.TAKEN) if WORLD.rank < ranks else []))
    if WORLD.rank:
        return
    assert f"written by {old} ranks; the epoch's unseen samples re-sharded over {new}" in stdout
    assert f"batch {round(batch * old / new) if keep else batch} per rank" in stdout, stdout
    before = [i for r in range(old) for i in taken[0][r][:stop * batch]]  # each old rank's first `stop` steps
    after = [i for r in range(new) for i in taken[1][r]]
    epoch = {i for r in range(old) for i in taken[0][r]}  # what the old ranks took in the whole epoch
    seen = collections.Counter(before + after)
    assert max(seen.values()) == 1, f"{sum(v > 1 for v in seen.values())} samples taken twice"
    assert set(seen) == epoch, f"{len(epoch - set(seen))} of the epoch's samples missed"
    assert read_summary(out / "run")["world_size"] == new


@pytest.mark.parametrize(("algo", "old", "new"), [("easgd", 4, 5), ("downpour", 5, 4)])
@one_side_fails_all
def test_an_async_run_resumed_at_another_size_trains_on_each_sample_of_its_epoch_once(algo, old, new, shared,
                                                                                       capsys):
    """An async checkpoint in the middle of the only epoch, written with ``old - 2``
    workers, resumed with ``new - 2``: every worker starts from the center, and the samples
    each old worker took before the checkpoint (as far as its file says it got) and those
    the new workers take are, each once, what the old workers took in their whole epoch."""
    import user_data

    out, batch = shared / f"async-resize-{algo}", 16
    flags = ["--algo", algo, "--dataset", "user_data:counted_regression", "--task", "regression", "--model",
             "user_data:counting_mlp", "--epochs", "1", "--batch-size", str(batch), "--prefetch", "0",
             "--out", str(out), "--run-name", "run", "--tau", "2", "--optimizer", "adamw", "--lr", "0.003"]
    status, _ = train(old, *flags, "--checkpoint-every", "17", capsys=capsys)  # (~34 updates in all)
    first = WORLD.gather(list(user_data.TAKEN) if 1 <= WORLD.rank < old - 1 else None)
    ckpt = WORLD.bcast(sorted((out / "run" / "checkpoints").glob("step-*"))[0] if WORLD.rank == 0 else None)
    # each old worker's position in it (read now: the resumed run's checkpoints replace it)
    positions = {rank: torch.load(ckpt / f"rank-{rank:05d}.pt", weights_only=True)["position"]
                 for rank in range(1, old - 1)} if WORLD.rank == 0 else {}
    status2, stdout = train(new, *flags, "--resume", str(ckpt), capsys=capsys)
    second = WORLD.gather(list(user_data.TAKEN) if 1 <= WORLD.rank < new - 1 else None)
    if WORLD.rank:
        return
    assert status == status2 == 0
    assert f"written by {old} ranks: each worker starts from the center" in stdout
    before = []
    for rank, position in positions.items():  # each old worker's samples up to its position in the checkpoint
        before += first[rank] if position["epoch"] > 0 else first[rank][:position["step"] * batch]  # (or all)
    after = [i for rank in range(1, new - 1) for i in second[rank]]
    epoch = {i for rank in range(1, old - 1) for i in first[rank]}
    seen = collections.Counter(before + after)
    assert max(seen.values()) == 1, f"{sum(v > 1 for v in seen.values())} samples taken twice"
    assert set(seen) == epoch, f"{len(epoch - set(seen))} of the epoch's samples missed"
    summary = read_summary(out / "run")
    assert summary["world_size"] == new and summary["workers"] == new - 2
