"""The run directory and what goes into it, written by exactly one rank.

The owning rank gets a :class:`RunLog`; every other rank a :class:`NullRunLog` with the
same methods that do nothing, so training code never asks ``if rank == 0``.

Files: ``config.toml`` (the resolved configuration, reusable with ``--config``),
``metrics.csv`` (one row per evaluation) and ``summary.json``.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from mpi_easgd import registry
from mpi_easgd.fileio import atomic_path, write_json_atomic, write_text_atomic

METRIC_FIELDS = ("wall_time", "epoch", "step", "samples", "train_loss", "test_loss", "test_accuracy")
POSITION_FIELDS = ("wall_time", "epoch", "step", "samples")  # the rest of a row are metrics
SHORT = {"test_accuracy": "test_acc"}  # names in the console line


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def run_summary(cfg, dataset: str, world_size: int, workers: int, *, test: dict, train_samples: int,
                train_seconds: float, nonfinite_skipped: int, exchanging: int | None = None, **specific) -> dict:
    """The summary every run writes (``summary.json``): the same keys for every algorithm,
    then ``specific`` ones (async: exchanges, per-worker rows...). ``test``: the final
    evaluation's ``test_accuracy`` and ``test_loss`` (None when there was none).
    ``exchanging``: the workers that exchange with the server, if not all (``--groups``)."""
    elastic = registry.lookup(cfg.algo).settings(cfg, exchanging or workers)
    return dict(
        algo=cfg.algo, model=cfg.model, dataset=dataset, world_size=world_size, workers=workers,
        epochs=cfg.epochs, optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, **elastic,
        test_accuracy=test.get("test_accuracy"), test_loss=test.get("test_loss"),
        train_samples=train_samples, train_seconds=train_seconds,
        train_samples_per_second=train_samples / train_seconds if train_seconds else 0.0,
        nonfinite_skipped=nonfinite_skipped, **specific,
    )


GOODPUT = ("goodput: useful samples (those whose effect reached the trained model: async, the center; sync, the "
           "parameters the ranks share) over samples computed; lost are a dead rank's steps since its last "
           "exchange (async) or its step in progress, and a step that no rank completed (sync, redone)")


def goodput(useful: int, lost: float, deaths: int) -> dict:
    """The summary's goodput (:data:`GOODPUT`) from the ``useful`` samples and those ``lost``;
    what a dead process computed after its last message is unknown to the others: each of
    ``deaths`` counts as half an exchange interval (async) or one batch (sync), said so."""
    computed = useful + lost
    return dict(goodput=useful / computed if computed else 1.0, useful_samples=int(useful),
                lost_samples=int(round(lost)), goodput_is=GOODPUT + (
                    f"; the {deaths} dead process(es)' last steps are estimated" if deaths else ""))


UTILIZATION = ("compute utilization: the share of a rank's training wall time not spent blocked in an "
               "exchange (async: waiting for a reply; sync: inside the collective calls)")


def traffic_summary(rows: list[dict], per_exchange: tuple[int, int], unit: str) -> dict:
    """The summary's account of bytes and waiting. ``rows``: one per training rank, with
    ``bytes_sent``, ``bytes_received``, ``exchange_seconds`` and ``train_seconds``;
    ``per_exchange``: the bytes one exchange (``unit``: ``exchange`` or ``round``) hands
    MPI to send and gets back. Adds each row's ``compute_utilization``
    (:data:`UTILIZATION`)."""
    for row in rows:
        wall = row["train_seconds"]
        row["compute_utilization"] = max(0.0, 1.0 - row["exchange_seconds"] / wall) if wall > 0 else None
    shares = [r["compute_utilization"] for r in rows if r["compute_utilization"] is not None]
    return {f"bytes_sent_per_{unit}": per_exchange[0], f"bytes_received_per_{unit}": per_exchange[1],
            "bytes_sent": sum(r["bytes_sent"] for r in rows), "bytes_received": sum(r["bytes_received"] for r in rows),
            "compute_utilization": sum(shares) / len(shares) if shares else None,
            "compute_utilization_is": UTILIZATION}


class RunLog:
    """Owner of one run directory: config, metrics rows, summary, console output."""

    def __init__(self, run_dir: Path, config: dict, progress: bool = True, tensorboard: bool = False,
                 started: float | None = None, resumed_at: int | None = None, warnings: list[str] = ()):
        """``started``: the run's ``time.perf_counter()`` origin (a resumed run's clock goes
        on from its checkpoint's). ``resumed_at``: the step of the checkpoint a resumed run
        continues from; metrics.csv keeps its rows up to that step and the run appends to
        them (rows past it were logged by a segment whose later work is being redone)."""
        self.run_dir = Path(run_dir)
        self.warnings = list(warnings)  # said already; kept in the summary
        metrics = self.run_dir / "metrics.csv"
        self.start = time.perf_counter() if started is None else started
        self.show_progress = progress
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        lines = [f"{k} = {_toml_value(v)}" for k, v in sorted(config.items()) if v is not None]
        write_text_atomic(self.run_dir / "config.toml", "\n".join(lines) + "\n")
        # metrics.csv: the rows of a resumed run's earlier segments up to its checkpoint; the
        # columns are METRIC_FIELDS and whatever else the evaluations report, fixed by the
        # first row (or the file being continued).
        self._metrics = metrics
        self._rows: list[dict] = []
        self._fields: list[str] | None = None
        if resumed_at is not None and metrics.is_file():
            with metrics.open(newline="") as fh:
                reader = csv.DictReader(fh)
                self._rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= resumed_at]
                self._fields = list(reader.fieldnames or METRIC_FIELDS)
        self._csv_file = None
        self._csv = None
        self._open(self._fields)

    def _open(self, fields: list[str] | None) -> None:
        """(Re)write metrics.csv with its header and kept rows, then append from there; with
        no columns known yet, an empty file until the first evaluation."""
        with atomic_path(self._metrics) as tmp, open(tmp, "w", newline="") as fh:
            if fields is not None:
                writer = csv.DictWriter(fh, fieldnames=fields)
                writer.writeheader()
                writer.writerows({k: r.get(k, "") for k in fields} for r in self._rows)
        if fields is not None:
            self._fields = fields
            self._csv_file = open(self._metrics, "a", newline="")  # noqa: SIM115
            self._csv = csv.DictWriter(self._csv_file, fieldnames=fields, extrasaction="ignore")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def info(self, message: str) -> None:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()

    def warn(self, message: str) -> None:
        """Say something the user must not miss (on stderr), and keep it in the summary."""
        self.warnings.append(message)
        tqdm.write(f"mpi_easgd: warning: {message}", file=sys.stderr)

    def log_eval(self, **row) -> None:
        """Append one evaluation row (``wall_time`` is filled in when missing): the position
        (epoch, step, samples) and any metrics, each a number."""
        row.setdefault("wall_time", round(self.elapsed(), 3))
        if self._csv is None:  # the first row says which metrics there are
            self._open([*METRIC_FIELDS, *(k for k in row if k not in METRIC_FIELDS)])
        self._csv.writerow({k: row.get(k, "") for k in self._fields})
        self._csv_file.flush()
        metrics = {k: v for k, v in row.items() if k not in POSITION_FIELDS}
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, global_step=row.get("samples", 0))
            self._tb.flush()
        shown = " ".join(f"{SHORT.get(k, k)} {v:.4f}" for k, v in metrics.items())
        self.info(f"[{row['wall_time']:7.1f}s] epoch {row.get('epoch', '-')} step {row.get('step', '-')} {shown}")

    def progress(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not self.show_progress, leave=False,
                    mininterval=0.5, dynamic_ncols=True, file=sys.stderr)

    def write_summary(self, summary: dict) -> None:
        if self._csv_file is not None:
            self._csv_file.close()
        if self._tb is not None:
            self._tb.close()
        write_json_atomic(self.run_dir / "summary.json", dict(summary, warnings=self.warnings))
        self.info(format_summary(summary))
        self.info(f"run directory: {self.run_dir}")


class _NullBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *a, **k) -> None: ...
    def close(self) -> None: ...


class NullRunLog:
    """The run log of a rank that does not own the run directory: does nothing."""

    def elapsed(self) -> float:
        return 0.0

    def info(self, message: str) -> None: ...
    def warn(self, message: str) -> None: ...
    def log_eval(self, **row) -> None: ...
    def write_summary(self, summary: dict) -> None: ...

    def progress(self, total: int, desc: str) -> _NullBar:
        return _NullBar()


def format_summary(summary: dict) -> str:
    """A short human-readable table of a run's summary (per-worker rows when present)."""
    keys = ("algo", "model", "world_size", "workers", "epochs", "test_accuracy", "test_loss",
            "wall_seconds", "train_samples_per_second", "exchanges", "beta", "exchange_dtype",
            "bytes_sent_per_round", "bytes_sent_per_exchange", "bytes_received_per_exchange",
            "compute_utilization")
    lines = ["", "run summary", "-" * 40]
    shown = [(k, summary[k]) for k in keys if summary.get(k) is not None]
    shown[5:5] = [(k, v) for k, v in summary.get("final_metrics", {}).items() if k not in summary]
    for k, v in shown:
        lines.append(f"{k:<29}{v:.4f}" if isinstance(v, float) else f"{k:<29}{v}")
    per_worker = summary.get("per_worker")
    if per_worker:
        cols = [c for c in ("rank", "exchanges", "latency_ms_mean", "latency_ms_p50", "latency_ms_p99",
                            "staleness_mean", "samples", "wall_seconds", "compute_utilization")
                if any(c in w for w in per_worker)]
        lines.append("")
        lines.append("  ".join(f"{c:>15}" for c in cols))
        for w in per_worker:
            cells = [f"{w[c]:>15.3f}" if isinstance(w.get(c), float) else f"{w.get(c, '-'):>15}" for c in cols]
            lines.append("  ".join(cells) + ("  (died)" if w.get("died") else "  (dropped)" if w.get("lost") else ""))
    return "\n".join(lines)
