"""The README's CIFAR-10 walkthrough, end to end on small fake CIFAR-10 batches:
convert the python batches, train with the shipped configs, plot the two runs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ROOT, make_cifar, mpirun, read_summary
from PIL import Image

from mpi_easgd.data.__main__ import main as data_main
from mpi_easgd.plot import main as plot_main

pytestmark = pytest.mark.launch


def run(module, *args, cwd, capsys):
    """``python -m module ARGS`` in this process (the commands' main functions; the
    training on one rank is ``mpi_easgd.train.run``, the command line's own function, on
    ``COMM_SELF``)."""
    import os

    from mpi4py import MPI

    from mpi_easgd.train import run as train_run

    main = {"mpi_easgd.data": data_main, "mpi_easgd.plot": plot_main,
            "mpi_easgd.train": lambda argv: train_run(argv, MPI.COMM_SELF)}[module]
    here = os.getcwd()
    os.chdir(cwd)
    try:
        code = main(list(args))
    finally:
        os.chdir(here)
    return code, capsys.readouterr().err


def test_cifar10_batches_to_training_to_plot(tmp_path, capsys):
    make_cifar(tmp_path / "cifar-10-batches-py")
    code, err = run("mpi_easgd.data", "convert", "cifar-10-batches-py", "data/cifar10.h5", cwd=tmp_path, capsys=capsys)
    assert code == 0, err
    runs = []
    for algo, ranks in (("easgd", 4), ("sgd", 1)):  # one launch; sgd runs in this process
        config = ROOT / "jobs" / "configs" / f"cifar10_{algo}.toml"
        args = ("--config", str(config), "--epochs", "2", "--batch-size", "4", "--test-every", "0.2",
                "--no-progress", "--out", "runs", "--run-name", algo)
        if ranks > 1:
            r = mpirun(ranks, "-m", "mpi_easgd.train", *args, cwd=tmp_path, timeout=180)
            assert r.returncode == 0, r.output
        else:
            code, err = run("mpi_easgd.train", *args, cwd=tmp_path, capsys=capsys)
            assert code == 0, err
        summary = read_summary(tmp_path / "runs" / algo)
        assert (summary["algo"], summary["model"]) == (algo, "cifarnet")
        runs.append(f"runs/{algo}")
    code, err = run("mpi_easgd.plot", *runs, "-o", "compare.png", cwd=tmp_path, capsys=capsys)
    assert code == 0, err
    with Image.open(tmp_path / "compare.png") as im:
        assert im.size[0] > 800 and im.size[1] > 600
        colours = np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)
        assert len(colours) > 50, "the plot has lines, not a blank page"
    code, err = run("mpi_easgd.plot", "no_such_run", "-o", "x.png", cwd=tmp_path, capsys=capsys)
    assert code == 2 and "no metrics.csv" in err and not (tmp_path / "x.png").exists()
