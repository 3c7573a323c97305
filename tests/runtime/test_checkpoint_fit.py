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
