"""Fault-tolerant runs under real ``mpirun --with-ft ulfm`` (Open MPI): a process that dies
at a random moment, and the runs that go on without it. Each test fails on a hang (a
timeout) and on any process left behind."""

from __future__ import annotations

import os
import random

from conftest import read_summary, ulfm_train

SEED = int(os.environ.get("MPI_EASGD_FT_SEED", random.randrange(1 << 30)))  # printed on failure


def at_random(low: int, high: int, salt: int = 0) -> int:
    return random.Random(SEED + salt).randint(low, high)


def mnist(tmp_path, name: str, *flags: str) -> list[str]:
    return ["--dataset", "mnist5k", "--epochs", "8", "--out", str(tmp_path), "--run-name", name, *flags]


def test_easgd_goes_on_without_a_worker_killed_at_a_random_step(tmp_path):
    step = at_random(5, 350)  # of the 8 x 62 steps each worker takes
    why = f"worker rank 2 killed at its step {step} (MPI_EASGD_FT_SEED={SEED})"
    result = ulfm_train(4, *mnist(tmp_path, "kill", "--on-worker-loss", "continue", "--checkpoint-every", "30"),
                        env={"MPI_EASGD_FAULT": f"rank=2,action=kill,step={step}"})
    assert result.returncode == 0, f"{why}\n{result.output}"
    assert "transport set to btl tcp,self" in result.output
    assert "worker rank 2 died" in result.stderr, result.output
    summary = read_summary(tmp_path / "kill")
    assert summary["lost_workers"] == [2] and summary["dead_workers"] == [2], why
    assert summary["test_accuracy"] >= 0.95, f"{why}: {summary['test_accuracy']}"
    assert summary["checkpoints"] >= 3, why  # before and after the death
    survivor, dead = summary["per_worker"]
    assert survivor["exchanges"] == survivor["server_exchanges"] == survivor["reported_exchanges"], why
    assert dead["died"] and dead["server_exchanges"] >= step // 10, why  # tau 10: it had exchanged


def test_a_replacement_takes_over_a_worker_killed_at_a_random_step(tmp_path):
    step = at_random(5, 350, salt=1)
    why = f"worker rank 2 killed at its step {step} (MPI_EASGD_FT_SEED={SEED})"
    result = ulfm_train(4, *mnist(tmp_path, "respawn", "--on-worker-loss", "respawn"),
                        env={"MPI_EASGD_FAULT": f"rank=2,action=kill,step={step}"})
    assert result.returncode == 0, f"{why}\n{result.output}"
    assert "a new process takes its place" in result.stderr, result.output
    summary = read_summary(tmp_path / "respawn")
    assert summary["dead_workers"] == [2] and summary["lost_workers"] == [], why
    assert summary["test_accuracy"] >= 0.95, f"{why}: {summary['test_accuracy']}"
    (replacement,) = summary["replacements"]
    assert replacement["rank"] == 2 and replacement["exchanges_before"] == (step - 1) // 10 + 1, why
    assert 0 < replacement["seconds_to_first_exchange"] < 30, why
    for worker in summary["per_worker"]:  # the replacement goes on counting the dead worker's exchanges
        assert worker["exchanges"] == worker["server_exchanges"] == worker["reported_exchanges"], why
    assert summary["per_worker"][1]["exchanges"] > replacement["exchanges_before"], why
