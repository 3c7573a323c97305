"""Which differences refuse a resume, and what the refusal says (in this process)."""

from __future__ import annotations

import dataclasses

import pytest

from mpi_easgd.config import Config
from mpi_easgd.runtime.checkpoint import CheckpointError, check_fits


def refusal(saved: Config, mine: Config, workers: int = 2) -> str | None:
    manifest = {"config": dataclasses.asdict(saved.resolve(workers)), "world_size": workers}
    try:
        check_fits(manifest, dataclasses.asdict(mine.resolve(workers)), workers, "ckpt")
    except CheckpointError as exc:
        return str(exc)
    return None


def test_a_setting_counts_only_where_the_algorithm_uses_it():
    # sgd resolves an alpha it never uses: not a difference, and never named
    assert refusal(Config(algo="sgd"), Config(algo="sgd", alpha=0.3)) is None
    message = refusal(Config(algo="easgd"), Config(algo="sgd"))
    assert "is from --algo easgd, this run has --algo sgd; resume with --algo easgd" in message
    assert "alpha" not in message
    message = refusal(Config(algo="easgd", tau=4), Config(algo="ea", tau=8))
    assert "is from --algo easgd --tau 4, this run has --algo ea --tau 8" in message
    assert "--alpha 0.2 " in refusal(Config(algo="ea", alpha=0.2), Config(algo="ea", alpha=0.3)) + " "


@pytest.mark.parametrize(("saved", "mine", "named"), [
    (dict(algo="diloco"), dict(algo="diloco", fragments=2), "--fragments 1"),
    (dict(algo="ea", exchange_dtype="int4"), dict(algo="ea"), "--exchange-dtype int4"),
    (dict(algo="diloco", exchange_dtype="topk"), dict(algo="diloco", exchange_dtype="topk", topk_fraction=0.03),
     "--topk-fraction 0.02")])
def test_compression_and_streaming_settings_must_match(saved, mine, named):
    assert named in refusal(Config(**saved), Config(**mine))


def test_a_run_resumes_at_another_size_with_the_defaults_that_follow_it():
    def fit(saved: Config, mine: Config, old: int, new: int, resizable: bool = True) -> str | None:
        manifest = {"config": dataclasses.asdict(saved.resolve(old)), "world_size": old}
        try:
            check_fits(manifest, dataclasses.asdict(mine.resolve(new)), new, "ckpt",
                       dataclasses.asdict(mine.resolve(old)) if resizable else None)
        except CheckpointError as exc:
            return str(exc)
        return None

    # alpha's default follows the number of workers: no difference; one set by hand must match
    assert fit(Config(algo="ea"), Config(algo="ea"), 4, 3) is None
    assert fit(Config(algo="easgd"), Config(algo="easgd"), 2, 3) is None
    message = fit(Config(algo="ea", alpha=0.2), Config(algo="ea", alpha=0.3), 4, 3)
    assert "--alpha 0.2" in message and message.endswith("; the number of ranks may change")
    assert "written by 4 ranks, this run has 3; resume with mpirun -np 4" in fit(Config(), Config(), 4, 3, False)


def test_an_async_run_at_another_size_keeps_its_servers_and_has_no_groups():
    from mpi_easgd.runtime.session import resize_refusal
    from mpi_easgd.topology import Topology

    def refused(saved: dict, mine: Config) -> str | None:
        manifest = {"config": dataclasses.asdict(Config(**saved)), "world_size": 5}
        return resize_refusal(manifest, mine, Topology.build(6, 0, mine.algo, mine.servers))

    assert refused(dict(algo="easgd"), Config(algo="easgd")) is None
    assert refused(dict(algo="ea"), Config(algo="ea")) is None
    assert "--servers 2: resume with --servers 2 (the number of workers may change)" in \
        refused(dict(algo="easgd", servers=2), Config(algo="easgd"))
    assert "a run with --groups resumes on as many ranks (mpirun -np 5)" in \
        refused(dict(algo="easgd", groups="2"), Config(algo="easgd", groups="2"))


def test_a_checkpoint_written_again_at_its_step_never_leaves_latest_on_an_incomplete_one(tmp_path):
    """The final checkpoint at the step of a periodic one that more ranks wrote (their last
    epoch's end was redone after a death): the old one is removed whole, ``latest`` names
    the checkpoint before it meanwhile, and none of the old ranks' files is left."""
    from mpi_easgd.runtime import checkpoint

    def write(step: int, ranks: int) -> None:
        ckpt = checkpoint.step_dir(tmp_path, step)
        for rank in range(ranks):
            checkpoint.save_rank(ckpt, rank, {"rank": rank})
        checkpoint.commit(tmp_path, ckpt, {"world_size": ranks, "step": step})

    write(20, 3)
    write(30, 3)
    checkpoint.retract(tmp_path, checkpoint.step_dir(tmp_path, 30))
    assert checkpoint.latest(tmp_path) == checkpoint.step_dir(tmp_path, 20)
    write(30, 2)
    assert checkpoint.latest(tmp_path) == checkpoint.step_dir(tmp_path, 30)
    assert sorted(p.name for p in checkpoint.step_dir(tmp_path, 30).iterdir()) == \
        ["manifest.json", "rank-00000.pt", "rank-00001.pt"]
    checkpoint.retract(tmp_path, checkpoint.step_dir(tmp_path, 20))
    checkpoint.retract(tmp_path, checkpoint.step_dir(tmp_path, 30))  # (the only one: no latest at all)
    assert checkpoint.latest(tmp_path) is None and not (tmp_path / "checkpoints" / "latest").exists()
