"""``python -m mpi_easgd.plot RUN_DIR [RUN_DIR ...] -o out.png``: compare runs.

Draws test error (log scale) and test loss against wall time and against samples seen,
one line per run, labelled by run directory, algorithm, workers and tau (from each run's
``summary.json`` and ``config.toml``; "unfinished" when it has no summary yet), headless
(matplotlib's Agg backend).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import matplotlib
import tomllib

from mpi_easgd import registry

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_run(run_dir: Path) -> tuple[str, dict[str, list[float]]]:
    """(label, columns of metrics.csv) of one run directory."""
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.csv; is it a run directory?")
    with metrics.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["test_accuracy"]]
    cols = {k: [float(r[k]) for r in rows] for k in ("wall_time", "samples", "test_accuracy", "test_loss")}
    summary_path, config_path = run_dir / "summary.json", run_dir / "config.toml"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    config = tomllib.loads(config_path.read_text()) if config_path.is_file() else {}
    algo = summary.get("algo", config.get("algo", "?"))
    details = [algo]
    if summary.get("workers"):
        details.append(f"{summary['workers']} workers")  # async: ranks less the server and the tester
    if algo in registry.using("tau") and "tau" in config:
        details.append(f"tau {config['tau']}")
    if not summary:
        details.append("unfinished")
    label = f"{run_dir.name} ({', '.join(details)})"
    return label, cols


def plot(run_dirs: list[Path], out: Path, title: str | None = None) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharey="row")
    for run_dir in run_dirs:
        label, cols = load_run(run_dir)
        for row, metric in enumerate(("test_accuracy", "test_loss")):
            for col, x in enumerate(("wall_time", "samples")):
                y = [1 - a for a in cols[metric]] if metric == "test_accuracy" else cols[metric]
                axes[row, col].plot(cols[x], y, marker=".", label=label)
    for col, xlabel in enumerate(("wall time (s)", "training samples seen (all ranks)")):
        axes[1, col].set_xlabel(xlabel)
    # Error on a log scale: the late differences between runs (98.0% vs 98.5%) stay visible
    # next to the start of training, where an accuracy axis from 0 to 1 flattens them.
    axes[0, 0].set_ylabel("test error (1 - accuracy, log scale)")
    axes[0, 0].set_yscale("log")
    axes[1, 0].set_ylabel("test loss")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title or "mpi_easgd runs")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpi_easgd.plot", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("-o", "--output", type=Path, default=Path("runs.png"), help="PNG to write")
    parser.add_argument("--title", help="figure title")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {plot(args.runs, args.output, args.title)}")
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"mpi_easgd.plot: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
