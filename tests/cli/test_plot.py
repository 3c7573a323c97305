"""python -m mpi_easgd.plot: runs told apart in the legend."""

from __future__ import annotations


def test_plot_labels_tell_runs_apart(tmp_path):
    """Two easgd runs, and an unfinished one, each get their own label: the run directory,
    then algorithm, workers (not ranks) and tau."""
    import json

    from mpi_easgd.plot import load_run, main

    for name, summary in (("a", {"algo": "easgd", "workers": 2, "world_size": 4}), ("b", {"algo": "easgd",
                          "workers": 2, "world_size": 4}), ("cut", None)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.toml").write_text('algo = "easgd"\ntau = 10\n')
        (run / "metrics.csv").write_text("wall_time,epoch,step,samples,train_loss,test_loss,test_accuracy\n"
                                         "1.0,1,10,320,0.5,0.4,0.9\n2.0,2,20,640,0.3,0.2,0.98\n")
        if summary:
            (run / "summary.json").write_text(json.dumps(summary))
    labels = [load_run(tmp_path / n)[0] for n in ("a", "b", "cut")]
    assert labels == ["a (easgd, 2 workers, tau 10)", "b (easgd, 2 workers, tau 10)", "cut (easgd, tau 10, unfinished)"]
    assert main([str(tmp_path / n) for n in ("a", "b", "cut")] + ["-o", str(tmp_path / "p.png")]) == 0
