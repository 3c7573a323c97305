"""python -m mpi_easgd.plot: runs named by what differs between them, seeds as a band,
train and test loss from a common start."""

from __future__ import annotations

import json

import pytest

from mpi_easgd.plot import Run, labels, main, mean_band

HEADER = "wall_time,epoch,step,samples,train_loss,test_loss,test_accuracy\n"


def make_run(root, name, config: dict, rows: list[tuple], finished: bool = True):
    run = root / name
    run.mkdir()
    run.joinpath("config.toml").write_text("".join(f'{k} = {json.dumps(v)}\n' for k, v in config.items()))
    run.joinpath("metrics.csv").write_text(HEADER + "".join(",".join(map(str, r)) + "\n" for r in rows))
    if finished:
        run.joinpath("summary.json").write_text(json.dumps({"algo": config["algo"]}))
    return run


def rows(startup: float, scale: float) -> list[tuple]:
    """The evaluation before the first step (samples 0), then two more."""
    return [(startup, 0, 0, 0, 2.3, 2.3, 0.1), (startup + 1, 1, 10, 320, 0.5 * scale, 0.4 * scale, 0.9),
            (startup + 2, 2, 20, 640, 0.3 * scale, 0.2 * scale, 0.98)]


def test_runs_are_named_by_what_differs_and_seeds_are_one_band(tmp_path):
    base = {"algo": "easgd", "model": "lenet", "tau": 10, "out": "runs"}
    runs = [make_run(tmp_path, "a", {**base, "seed": 0}, rows(3.0, 1.0)),
            make_run(tmp_path, "b", {**base, "seed": 1}, rows(5.0, 1.2)),  # the same configuration, another seed
            make_run(tmp_path, "c", {**base, "tau": 40, "seed": 0}, rows(3.0, 1.1)),
            make_run(tmp_path, "d", {**base, "algo": "sgd"}, rows(2.0, 1.0), finished=False)]
    loaded = [Run(r) for r in runs]
    groups = [[loaded[0], loaded[1]], [loaded[2]], [loaded[3]]]
    assert labels(groups) == ["easgd, tau 10, 2 seeds (start-up 4.0s)", "easgd, tau 40 (start-up 3.0s)",
                              "sgd, unfinished (start-up 2.0s)"]  # (sgd has no tau)
    assert loaded[1].cols["seconds"].tolist() == [0.0, 1.0, 2.0], "wall time since the first step"
    grid, mean, low, high = mean_band(groups[0], "samples", "test_loss")
    assert grid.tolist() == [0, 320, 640] and mean[1] == pytest.approx(0.44) and (low[1], high[1]) == (0.4, 0.48)
    assert main([str(r) for r in runs] + ["-o", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_a_folder_without_evaluations_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.csv").write_text("")
    assert main([str(tmp_path / "empty"), "-o", str(tmp_path / "x.png")]) == 2
    assert "has no evaluation" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
