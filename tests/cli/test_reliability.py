"""Faults under real mpiexec: exact resume, stop signals, killed ranks, NaNs, bad
checkpoints, a full disk. Each case reports how long the job took to end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import finish, launch, read_summary, train

pytestmark = pytest.mark.launch


def base(blobs, out, name, algo="sgd"):
    return ["--algo", algo, "--dataset", str(blobs), "--model", "mlp", "--epochs", "3", "--batch-size", "16",
            "--momentum", "0.9", "--tau", "3", "--out", str(out), "--run-name", name]


def final_states(run_dir, ranks):
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return [torch.load(ckpt / f"rank-{r:05d}.pt", weights_only=True) for r in range(ranks)]


def test_interrupted_and_resumed_run_is_bitwise_identical(blobs, tmp_path):
    """ea (its center too); sgd: the stop-signal test below."""
    algo = "ea"
    assert train(2, *base(blobs, tmp_path, "full", algo), "--checkpoint-every", "5").returncode == 0
    cut = train(2, *base(blobs, tmp_path, "cut", algo), "--checkpoint-every", "5",
                env={"MPI_EASGD_FAULT": "rank=1,action=raise,step=23"})
    assert cut.returncode != 0
    resumed = train(2, *base(blobs, tmp_path, "cut", algo), "--checkpoint-every", "5", "--resume", "auto")
    assert resumed.returncode == 0, resumed.output
    assert "resumed from" in resumed.stdout and "step-000000020" in resumed.stdout
    assert_same_final_states(tmp_path / "full", tmp_path / "cut")
    for a, b in zip(final_states(tmp_path / "full", 2), final_states(tmp_path / "cut", 2)):
        assert torch.equal(a["algorithm"]["center"], b["algorithm"]["center"])
    full, cut = read_summary(tmp_path / "full"), read_summary(tmp_path / "cut")
    assert full["test_accuracy"] == cut["test_accuracy"] and full["test_loss"] == cut["test_loss"]
    # Statistics go on across segments: the run's wall clock covers its training time.
    assert cut["train_seconds"] <= cut["wall_seconds"], cut
    assert cut["train_samples"] == full["train_samples"]
    epochs = [row.split(",")[1] for row in (tmp_path / "cut" / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == ["0", "1", "2", "3"], "rows past the checkpoint are redone, not repeated"


def signal_mid_run(ranks, args, metrics, env, rows=2):
    """Start a run, SIGTERM the launcher once ``metrics`` has ``rows`` lines; returns
    (exit status, stderr, seconds from the signal to the end)."""
    proc = launch(ranks, "-m", "mpi_easgd.train", "--no-progress", *args, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= rows):
        time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # mpiexec forwards it to every rank
    _, err = finish(proc, 60, "the job after SIGTERM")
    return proc.returncode, err, time.monotonic() - sent


def assert_same_final_states(a_dir, b_dir, ranks=2):
    for a, b in zip(final_states(a_dir, ranks), final_states(b_dir, ranks)):
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), key


def test_stop_signal_checkpoints_exits_75_and_resumes(blobs, tmp_path):
    """Stopped by SIGTERM mid-epoch, resumed: bitwise the run that was never stopped."""
    metrics = tmp_path / "sig" / "metrics.csv"
    args = [*base(blobs, tmp_path, "sig"), "--epochs", "6"]
    rc, err, seconds = signal_mid_run(2, args, metrics, {"MPI_EASGD_FAULT": "rank=1,action=sleep,seconds=0.05"},
                                      rows=3)  # the header, the evaluation before the first step, epoch 1
    assert rc == 75, err
    assert seconds < 10, f"took {seconds:.1f}s to checkpoint and stop"
    assert "continue with --resume auto" in err
    assert len(metrics.read_text().splitlines()) < 8, "the signal came too late to test anything"
    r = train(2, *args, "--resume", "auto")
    assert r.returncode == 0, r.output
    epochs = [line.split(",")[1] for line in metrics.read_text().splitlines()[1:]]
    assert epochs == [str(e) for e in range(0, 7)], "every epoch logged once, in order (0: before the first step)"
    assert train(2, *base(blobs, tmp_path, "full"), "--epochs", "6").returncode == 0
    assert_same_final_states(tmp_path / "full", tmp_path / "sig")


def test_async_stop_signal_checkpoints_every_role_and_resumes(tmp_path):
    run = tmp_path / "async"
    args = ["--algo", "easgd", "--epochs", "4", "--test-every", "0.3", "--out", str(tmp_path), "--run-name", "async"]
    rc, err, seconds = signal_mid_run(4, args, run / "metrics.csv",
                                      {"MPI_EASGD_FAULT": "rank=2,action=sleep,seconds=0.03"})
    assert rc == 75 and seconds < 10, (rc, seconds, err)
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "manifest.json", "rank-00000.pt", "rank-00001.pt", "rank-00002.pt", "rank-00003.pt"]
    saved = {r: torch.load(ckpt / f"rank-{r:05d}.pt", weights_only=True)["position"] for r in (1, 2)}
    r = train(4, *args, "--resume", "auto")
    assert r.returncode == 0, r.output
    summary = read_summary(run)
    for w in summary["per_worker"]:
        assert w["steps"] == 4 * (2000 // 32), "every worker finished all its epochs across the stop"
        assert w["exchanges"] == w["server_exchanges"] == w["reported_exchanges"]
        # Statistics over both segments: staleness counts only the others' updates between two
        # exchanges (2 workers, about 1, not the whole first segment's count), and the time
        # behind the samples includes the first segment's.
        assert w["staleness_max"] < 30, w
        assert w["wall_seconds"] > saved[w["rank"]]["seconds"] > 0, w
    assert summary["train_seconds"] <= summary["wall_seconds"]
    assert summary["test_accuracy"] > 0.9


def test_a_killed_rank_ends_the_job_without_orphans(blobs, tmp_path):
    marker = f"orphan-check-{os.getpid()}"
    r = train(3, *base(blobs, tmp_path, marker), "--epochs", "200", timeout=60,
              env={"MPI_EASGD_FAULT": "rank=1,action=kill,step=5"})
    assert r.returncode != 0
    assert r.seconds < 30, f"took {r.seconds:.1f}s to end after SIGKILL"
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    assert not left, f"orphan processes: {left}"


def test_nan_is_skipped_or_stops_the_job(blobs, tmp_path):
    nan = {"MPI_EASGD_FAULT": "rank=1,action=nan,step=3"}
    r = train(2, *base(blobs, tmp_path, "skip"), env=nan)
    assert r.returncode == 0, r.output
    summary = read_summary(tmp_path / "skip")
    assert summary["nonfinite_skipped"] == 1 and summary["test_accuracy"] > 0.5
    states = final_states(tmp_path / "skip", 2)
    assert all(torch.isfinite(v).all() for s in states for v in s["model"].values())
    r = train(2, *base(blobs, tmp_path, "stop"), "--on-nonfinite", "stop", env=nan, timeout=60)
    assert r.returncode != 0 and "non-finite loss or gradient on rank 1" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_checkpoints_are_refused_with_one_line(blobs, tmp_path):
    """Each bad checkpoint is refused by the rank that finds it, with one line. Launched once
    (a corrupted file found while loading, on a checkpoint resumed to train on: exit 1, one
    line, no traceback, the job ends quickly); every case in-process, as each rank checks."""
    from mpi_easgd.runtime.checkpoint import CheckpointError
    from mpi_easgd.train import _validate

    assert train(2, *base(blobs, tmp_path, "good"), "--checkpoint-every", "5").returncode == 0
    good = tmp_path / "good" / "checkpoints"
    latest = good / (good / "latest").read_text()

    def copy(name):
        shutil.copytree(tmp_path / "good", tmp_path / name)
        return tmp_path / name / "checkpoints" / latest.name

    (copy("corrupt") / "rank-00001.pt").write_bytes(b"\x00garbage" * 10)
    truncated = copy("truncated") / "rank-00000.pt"
    truncated.write_bytes(truncated.read_bytes()[:100])
    (copy("incomplete") / "manifest.json").unlink()
    r = train(2, *base(blobs, tmp_path, "any"), "--epochs", "4", "--resume", str(tmp_path / "corrupt"), timeout=60)
    lines = [x for x in r.stderr.splitlines() if x.startswith("mpi_easgd: error:")]
    assert r.returncode in (1, 2) and len(lines) == 1, r.stderr
    assert "rank-00001.pt is corrupted or truncated" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.seconds < 30, r.stderr
    cases = [
        (2, 1, "corrupt", [], "rank-00001.pt is corrupted or truncated"),
        (2, 0, "truncated", [], "rank-00000.pt is corrupted or truncated"),
        (2, 0, str(tmp_path / "incomplete" / "checkpoints" / latest.name), [], "is incomplete (no manifest.json"),
        (2, 0, "good", ["--algo", "ea"], "is from --algo sgd, this run has --algo ea; resume with --algo sgd"),
        (3, 2, "good", [], None),  # a synchronous run resumes at another size (rank 2 reads rank 0's file)
        (3, 0, "good", ["--algo", "easgd"], "is from --algo sgd, this run has --algo easgd"),
        (2, 0, "good", ["--lr", "0.05", "--batch-size", "8"],
         "is from --batch-size 16 --lr 0.1, this run has --batch-size 8 --lr 0.05; resume with --batch-size 16"),
        (2, 0, "good", ["--epochs", "2", "--checkpoint-every", "5"], None),  # finished: nothing to refuse
    ]
    for size, rank, where, extra, message in cases:
        resume = where if where.startswith("/") else str(tmp_path / where)
        argv = [*base(blobs, tmp_path, "any"), *extra, "--resume", resume, "--no-progress"]
        if message is None:
            _validate(argv, rank, size)
            continue
        with pytest.raises(CheckpointError) as info:
            _validate(argv, rank, size)
        assert message in str(info.value) and "\n" not in str(info.value), (where, info.value)


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(blobs, tmp_path):
    """The next checkpoint's temporary file is made a link to /dev/full, so rank 0's write
    fails with a real ENOSPC ("No space left on device") part-way through the checkpoint."""
    assert train(2, *base(blobs, tmp_path, "disk"), "--epochs", "1").returncode == 0
    ckpts = tmp_path / "disk" / "checkpoints"
    previous = (ckpts / "latest").read_text()
    upcoming = ckpts / "step-000000032"  # the end of epoch 2: 2 epochs x 16 steps
    upcoming.mkdir()
    (upcoming / ".rank-00000.pt.tmp").symlink_to("/dev/full")
    r = train(2, *base(blobs, tmp_path, "disk"), "--epochs", "2", "--resume", "auto", timeout=60)
    assert r.returncode != 0 and r.seconds < 30
    lines = [x for x in r.stderr.splitlines() if x.startswith("mpi_easgd: error:")]
    assert len(lines) == 1 and "could not write checkpoint" in lines[0], r.stderr
    assert "No space left on device" in lines[0] and f"{previous} is intact" in lines[0]
    assert (ckpts / "latest").read_text() == previous, "the previous checkpoint stays the latest"
    assert not list(ckpts.rglob(".*.tmp")), "no half-written file is left"
    assert not (upcoming / "manifest.json").exists()


@pytest.mark.parametrize("victim,message", [
    ("1", "worker rank 1 sent nothing for"),
    ("0", "the server (rank 0) sent nothing for"),
    ("3", "tester rank 3"),  # "did not take the final center", or silent in the final gather
], ids=["worker", "server", "tester"])
def test_a_hung_peer_in_async_ends_the_job(victim, message, tmp_path):
    """A SIGSTOPped worker is detected by the server's watchdog, a SIGSTOPped server by the
    workers'; a SIGSTOPped tester never holds training up, and only the hand-off of the
    final center times out."""
    marker = f"hung-{victim}-{os.getpid()}"
    epochs = "3" if victim == "3" else "1"  # the tester must be stopped before training ends
    r = train(4, "--epochs", epochs, "--worker-timeout", "3", "--test-every", "0.3", "--out", str(tmp_path),
              "--run-name", marker, timeout=90, env={"MPI_EASGD_FAULT": f"rank={victim},action=stop,step=1"})
    assert r.returncode != 0
    assert r.seconds < 40, f"took {r.seconds:.1f}s"
    lines = [x for x in r.stderr.splitlines() if x.startswith("mpi_easgd: error:")]
    # Each worker watches the server: both may say so (the same line) before the job ends.
    assert len(set(lines)) == 1 and message in lines[0], r.stderr
    if victim == "3":
        assert (tmp_path / marker / "center.pt").exists(), "training finished despite the hung tester"
    time.sleep(0.5)
    assert not subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()


def latest_checkpoint(run_dir):
    root = run_dir / "checkpoints"
    return root / (root / "latest").read_text()


def test_async_periodic_checkpoints_survive_a_crash_and_resume(tmp_path):
    """--checkpoint-every for async (downpour, int8 exchanges): the server pauses every
    worker at a step boundary, all roles write (a worker's residual too), then training
    goes on. A crash later resumes from the last one, and each worker's exchange count
    still agrees with the server's over both segments. Then a worker's checkpoint write
    fails (ENOSPC via /dev/full): it says so in one line, the server removes the
    incomplete checkpoint once every write is over, and the job ends."""
    run = tmp_path / "periodic"
    args = ["--algo", "downpour", "--exchange-dtype", "int8", "--epochs", "3", "--tau", "4", "--checkpoint-every",
            "15", "--out", str(tmp_path), "--run-name", "periodic"]
    cut = train(4, *args, env={"MPI_EASGD_FAULT": "rank=2,action=raise,step=140"}, timeout=90)
    assert cut.returncode != 0 and "InjectedFault" in cut.stderr
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert ckpts, "no periodic checkpoint before the crash"
    ckpt = latest_checkpoint(run)
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "manifest.json", "rank-00000.pt", "rank-00001.pt", "rank-00002.pt", "rank-00003.pt"]
    saved = torch.load(ckpt / "rank-00002.pt", weights_only=True)
    # The fault raises as step 140 (0-based) starts, when 140 steps are complete: a
    # checkpoint taken at that very boundary is still from before the crash.
    assert 0 < saved["position"]["t"] <= 140, "the checkpoint is from before the crash"
    assert saved["wire"]["residual"].abs().sum() > 0, "what the worker's compressed messages still owe is saved"
    resumed = train(4, *args, "--resume", "auto", timeout=90)
    assert resumed.returncode == 0, resumed.output
    summary = read_summary(run)
    for w in summary["per_worker"]:
        assert w["steps"] == 3 * (2000 // 32), "every worker finished its epochs across the crash"
        assert w["exchanges"] == w["server_exchanges"] == w["reported_exchanges"]
    assert summary["test_accuracy"] > 0.9

    ckpts = run / "checkpoints"
    previous = (ckpts / "latest").read_text()
    last = int(previous.split("-")[1])
    upcoming = [ckpts / f"step-{step:09d}" for step in range(last + 1, last + 40)]  # whichever comes first
    for ckpt in upcoming:
        ckpt.mkdir()
        (ckpt / ".rank-00001.pt.tmp").symlink_to("/dev/full")
    r = train(4, *args, "--epochs", "4", "--resume", "auto", timeout=60)
    assert r.returncode != 0 and r.seconds < 30
    lines = [x for x in r.stderr.splitlines() if x.startswith("mpi_easgd: error:")]
    assert len(lines) == 1 and "could not write checkpoint" in lines[0] and "No space left" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert (ckpts / "latest").read_text() == previous
    assert sum(not ckpt.exists() for ckpt in upcoming) == 1, "the incomplete checkpoint is removed"


def rank_pid(marker: str, rank: int) -> int:
    """The pid of ``rank`` in the job whose command line contains ``marker``."""
    for pid in subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split():
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"PMI_RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no rank {rank} in the job {marker}")


def stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP): state T in /proc/PID/stat."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def test_a_hung_worker_is_dropped_wakes_up_idle_and_rejoins_on_resume(tmp_path):
    """--on-worker-loss continue: a worker stopped (SIGSTOP, at a step boundary) long enough
    to be dropped, then continued (SIGCONT), as a swapping or briefly frozen node would be:
    it learns it was dropped and stays idle; the other worker finishes, the summary and
    checkpoint say who was lost, the job ends with exit 3 and leaves no process. Resuming
    with more epochs brings the lost worker back from the center."""
    marker = f"dropped-{os.getpid()}"
    run = tmp_path / marker
    args = ["--algo", "easgd", "--epochs", "10", "--tau", "1", "--worker-timeout", "3", "--on-worker-loss",
            "continue", "--out", str(tmp_path), "--run-name", marker]
    proc = launch(4, "-m", "mpi_easgd.train", "--no-progress", *args,  # the other worker trains ~10 s: past the SIGCONT
                  env={"MPI_EASGD_FAULT": "rank=1,action=stop,step=5;rank=2,action=sleep,seconds=0.01"})
    started = time.monotonic()
    metrics = run / "metrics.csv"
    while not metrics.exists() and time.monotonic() < started + 60:
        time.sleep(0.05)
    victim = rank_pid(marker, 1)
    while not stopped(victim) and time.monotonic() < started + 60:  # it stops itself at its step 5
        time.sleep(0.05)
    time.sleep(5.5)  # it is dropped 3-4 s later
    woken = subprocess.run(["kill", "-CONT", str(victim)]).returncode == 0  # False: the job already ended
    _, err = finish(proc, 90, "the job with a dropped worker")
    assert woken, f"the job ended before the dropped worker was continued:\n{err}"
    assert proc.returncode == 3, err
    assert time.monotonic() - started < 40
    assert "worker rank 1 sent nothing for" in err and "dropped it, the run goes on with 1 worker" in err
    assert "the server dropped worker rank 1" in err and "stays idle" in err
    summary = read_summary(run)
    assert summary["lost_workers"] == [1] and summary["test_accuracy"] > 0.5  # chance: 0.1
    by_rank = {w["rank"]: w for w in summary["per_worker"]}
    assert by_rank[1]["lost"] and by_rank[2]["steps"] == 10 * (2000 // 32)
    manifest = json.loads((latest_checkpoint(run) / "manifest.json").read_text())
    assert manifest["lost_ranks"] == [1] and manifest["rejoin"]["1"]["epoch"] == 10
    assert not (latest_checkpoint(run) / "rank-00001.pt").exists()
    time.sleep(0.5)
    assert not subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()

    r = train(4, *args, "--epochs", "11", "--resume", "auto", timeout=90)
    assert r.returncode == 0, r.output
    summary = read_summary(run)
    assert summary["lost_workers"] == []
    by_rank = {w["rank"]: w for w in summary["per_worker"]}
    assert by_rank[1]["steps"] == 2000 // 32, "the lost worker rejoined for the last epoch"
    assert by_rank[2]["steps"] == 11 * (2000 // 32)
    for w in by_rank.values():
        assert w["exchanges"] == w["server_exchanges"] == w["reported_exchanges"]


def test_a_hung_rank_in_sync_training_ends_the_job(blobs, tmp_path):
    """A SIGSTOPped rank would hold the others in their Allreduce forever; after
    --worker-timeout they end the job with a line naming the call they wait in."""
    marker = f"hung-sync-{os.getpid()}"
    r = train(2, *base(blobs, tmp_path, marker), "--epochs", "50", "--worker-timeout", "2", timeout=60,
              env={"MPI_EASGD_FAULT": "rank=1,action=stop,step=5"})
    assert r.returncode != 0 and r.seconds < 30, (r.seconds, r.output)
    lines = [x for x in r.stderr.splitlines() if x.startswith("mpi_easgd:")]
    assert len(lines) == 1 and "rank 0 has waited" in lines[0] and "AllReduceSGD.sum_and_normalize_gradients" \
        in lines[0] and "ending the job" in lines[0], r.stderr
    time.sleep(0.5)
    assert not subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()


def test_a_mismatched_collective_is_named_by_the_flight_record(tmp_path):
    """tests/mpi/mismatch.py: rank 1 reduces with another AllReduceSGD than ranks 0 and 2.
    Every rank's watchdog writes its record before the job ends; python -m mpi_easgd.flight
    names rank 1, its call and its line, against the others'."""
    from conftest import mpirun

    folder = tmp_path / "flight"
    result = mpirun(3, "-m", "mpi4py", "tests/mpi/mismatch.py", timeout=60,
                    env={"MPI_EASGD_FLIGHT_DIR": str(folder)})
    assert result.returncode != 0 and result.seconds < 30, result.output
    assert "python -m mpi_easgd.flight" in result.stderr, result.output
    assert sorted(p.name for p in folder.glob("rank-*.json")) == [f"rank-0000{r}.json" for r in range(3)]
    r = subprocess.run([sys.executable, "-m", "mpi_easgd.flight", str(folder)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    verdict = r.stdout.strip().splitlines()[-1]
    assert verdict.startswith("first mismatch: rank 1 is in AllReduceSGD#2.sum_and_normalize_gradients (call 1) "
                              "from tests/mpi/mismatch.py:22, while ranks 0, 2 are in "
                              "AllReduceSGD#1.sum_and_normalize_gradients (call 4)"), r.stdout
