"""``python -m mpi_easgd.plot RUN_DIR [RUN_DIR ...] -o out.png``: compare runs, as one would
show them in a talk.

- Train loss beside test loss, on a log scale, against training samples seen (all ranks)
  and against wall time since the first step (each run's start-up, the time before its
  first evaluation, is said in the legend, not drawn).
- Every run starts from the same point: its evaluation before the first step (sync runs
  evaluate the initial model; an async run's tester evaluates the first center).
- One legend names the runs by what differs between them (algorithm, model, any flag, from
  each run's ``config.toml``), not by directory.
- Runs that differ only by ``--seed`` are one configuration: drawn as their mean, with a
  band from the lowest to the highest.
- A run without a summary yet is drawn and marked "unfinished". Headless (matplotlib's Agg
  backend).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import matplotlib
import numpy as np
import tomllib

from mpi_easgd import registry

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Settings that do not change what is trained (where it is written, how it is shown).
IGNORED = {"out", "run_name", "resume", "progress", "tensorboard", "prefetch", "threads", "seed", "worker_timeout",
           "test_every", "checkpoint_every", "audit", "cuda_aware", "on_worker_loss", "on_rank_loss"}


class Run:
    """One run directory: its settings, and its evaluations as columns."""

    def __init__(self, run_dir: Path) -> None:
        metrics = run_dir / "metrics.csv"
        if not metrics.is_file():
            raise FileNotFoundError(f"{run_dir} has no metrics.csv; is it a run directory?")
        with metrics.open() as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("test_loss")]
        if not rows:
            raise ValueError(f"{run_dir} has no evaluation in its metrics.csv yet")
        self.dir = run_dir
        self.cols = {k: np.array([float(r[k]) if r.get(k) else np.nan for r in rows])
                     for k in ("wall_time", "samples", "train_loss", "test_loss")}
        config_path, summary_path = run_dir / "config.toml", run_dir / "summary.json"
        self.config = tomllib.loads(config_path.read_text()) if config_path.is_file() else {}
        self.finished = summary_path.is_file()
        if self.finished and not self.config:
            self.config = {"algo": json.loads(summary_path.read_text()).get("algo", "?")}
        first = int(np.nanargmin(self.cols["samples"]))
        self.startup = float(self.cols["wall_time"][first])  # until the evaluation before the first step
        self.cols["seconds"] = self.cols["wall_time"] - self.startup

    @property
    def setting(self) -> tuple:
        """What this run trained with: its settings, less those that change nothing here
        (where it wrote, how it showed progress, the seed) and the other algorithms' own."""
        unused = set()
        try:
            uses = registry.lookup(self.config.get("algo", "")).uses
            unused = {k for a in registry.ALGORITHMS.values() for k in a.uses} - uses
        except registry.AlgorithmError:  # (a user's rule that does not import here: keep everything)
            pass
        return tuple(sorted((k, str(v)) for k, v in self.config.items() if k not in IGNORED | unused))


def labels(groups: list[list[Run]]) -> list[str]:
    """Each configuration named by the settings in which it differs from the others
    (the algorithm by itself; others as ``name value``)."""
    settings = [dict(g[0].setting) for g in groups]
    keys = sorted({k for s in settings for k in s})
    # A setting differs when two configurations that have it give it different values.
    differ = [k for k in keys if len({s[k] for s in settings if k in s}) > 1] or ["algo"]
    differ.sort(key=lambda k: (k != "algo", k != "model", k))
    out = []
    for s, group in zip(settings, groups):
        parts = [s.get(k, "?") if k == "algo" else f"{k.replace('_', '-')} {s[k]}" for k in differ
                 if k in s or k == "algo"]
        if len(group) > 1:
            parts.append(f"{len(group)} seeds")
        if not all(r.finished for r in group):
            parts.append("unfinished")
        startup = np.mean([r.startup for r in group])
        out.append(f"{', '.join(parts)} (start-up {startup:.1f}s)")
    return out


def mean_band(group: list[Run], x: str, y: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The runs' ``y`` on a common grid of ``x`` (the first run's points, within the range
    every run covers): mean, lowest, highest."""
    grid = group[0].cols[x]
    top = min(np.nanmax(r.cols[x]) for r in group)
    grid = grid[grid <= top]
    values = np.array([np.interp(grid, r.cols[x], r.cols[y]) for r in group])
    return grid, values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def plot(run_dirs: list[Path], out: Path, title: str | None = None) -> Path:
    runs = [Run(d) for d in run_dirs]
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.setting, []).append(run)
    grouped = list(groups.values())
    names = labels(grouped)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharey=True)
    for colour, (group, name) in enumerate(zip(grouped, names)):
        for row, x in enumerate(("samples", "seconds")):
            for col, y in enumerate(("train_loss", "test_loss")):
                grid, mean, low, high = mean_band(group, x, y)
                ax = axes[row, col]
                ax.plot(grid, mean, marker=".", color=f"C{colour}", label=name if row == col == 0 else None)
                if len(group) > 1:
                    ax.fill_between(grid, low, high, color=f"C{colour}", alpha=0.2)
    for col, what in enumerate(("train loss (the model evaluated)", "test loss")):
        axes[0, col].set_title(what)
    for row, xlabel in enumerate(("training samples seen (all ranks)", "wall time since the first step (s)")):
        for ax in axes[row]:
            ax.set_xlabel(xlabel)
    for ax in axes.flat:
        ax.set_yscale("log")  # late differences between runs stay visible beside the start
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel("loss (log scale)")
    axes[1, 0].set_ylabel("loss (log scale)")
    fig.legend(loc="lower center", ncol=min(3, len(names)), fontsize=8, frameon=False)
    fig.suptitle(title or "mpi_easgd runs")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
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
