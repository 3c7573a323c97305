"""Checkpoints: every stateful piece of every rank, written atomically, resumable exactly.

Layout::

    RUN_DIR/checkpoints/step-000000500/rank-00000.pt   one file per rank (its own state)
                                      /rank-00001.pt
                                      /manifest.json   written last, by rank 0: complete
    RUN_DIR/checkpoints/latest                          name of the newest complete one

Each file is written to a temporary name, fsynced and renamed, and the manifest only after
every rank has written its file, so a crash or a full disk mid-checkpoint leaves the
previous checkpoint as the latest complete one. The manifest records the format version,
the resolved configuration, the world size and the loop position.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from mpi_easgd.fileio import write_atomic, write_json_atomic, write_text_atomic

FORMAT_VERSION = 1
KEEP = 2  # complete checkpoints kept per run


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted or does not fit this run."""


class CheckpointFailed(RuntimeError):
    """A rank could not write its part of a checkpoint (that rank printed why). Raised on
    every rank once all writes are over and the incomplete checkpoint is removed: the job
    ends, and nothing half-written is left."""


def root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return root(run_dir) / f"step-{step:09d}"


def checkpoint_step(ckpt: Path) -> int:
    """The step a checkpoint directory was written at (sync: global step; async: center updates)."""
    return int(Path(ckpt).name.split("-", 1)[1])


def rank_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"rank-{rank:05d}.pt"


def save_rank(ckpt: Path, rank: int, state: dict) -> None:
    """Write this rank's state into checkpoint directory ``ckpt`` (atomically)."""
    try:
        ckpt.mkdir(parents=True, exist_ok=True)
        write_atomic(rank_file(ckpt, rank), lambda fh: torch.save(state, fh))
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
        previous = latest(ckpt.parent.parent)
        raise CheckpointError(
            f"could not write checkpoint {rank_file(ckpt, rank)} ({exc}); free disk space or choose "
            f"another --out; " + (f"{previous} is intact" if previous else "no earlier checkpoint")
        ) from None


def try_save_rank(ckpt: Path, rank: int, state: dict) -> bool:
    """:func:`save_rank`, but a failure is printed here (one line) and returned as False,
    so that the job ends only after every rank's write is over (see :class:`CheckpointFailed`)."""
    try:
        save_rank(ckpt, rank, state)
        return True
    except CheckpointError as exc:
        print(f"mpi_easgd: error: {exc}", file=sys.stderr, flush=True)
        return False


def discard(ckpt: Path) -> None:
    """Remove checkpoint directory ``ckpt`` if it is incomplete (no manifest)."""
    if not (ckpt / "manifest.json").exists():
        shutil.rmtree(ckpt, ignore_errors=True)


def discard_incomplete(run_dir: Path) -> None:
    """Remove every incomplete checkpoint directory of ``run_dir`` (left by an interrupted
    checkpoint; call while no rank writes one)."""
    for partial in root(run_dir).glob("step-*"):
        discard(partial)


def retract(run_dir: Path, ckpt: Path) -> None:
    """Remove checkpoint directory ``ckpt`` (complete or not), which is to be written again
    at the same step by other ranks: ``latest`` first points to the newest other complete
    checkpoint, so that it names a complete one at every moment."""
    others = sorted(p for p in root(run_dir).glob("step-*") if p != ckpt and (p / "manifest.json").exists())
    if others:
        write_text_atomic(root(run_dir) / "latest", others[-1].name)
    else:
        (root(run_dir) / "latest").unlink(missing_ok=True)
    shutil.rmtree(ckpt, ignore_errors=True)


def commit(run_dir: Path, ckpt: Path, manifest: dict) -> None:
    """Mark ``ckpt`` complete (call after every rank saved) and make it the latest."""
    manifest = dict(manifest, format_version=FORMAT_VERSION)
    write_json_atomic(ckpt / "manifest.json", manifest)
    write_text_atomic(root(run_dir) / "latest", ckpt.name)
    complete = sorted(p for p in root(run_dir).glob("step-*") if (p / "manifest.json").exists())
    for old in complete[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in root(run_dir).glob("step-*"):  # left by an interrupted earlier checkpoint
        if partial != ckpt:
            discard(partial)


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or None."""
    pointer = root(run_dir) / "latest"
    if not pointer.is_file():
        return None
    ckpt = root(run_dir) / pointer.read_text().strip()
    return ckpt if (ckpt / "manifest.json").is_file() else None


def locate(resume: str, out: str, run_name: str) -> Path | None:
    """The checkpoint ``--resume`` names: a checkpoint directory, a run directory (its
    latest), or ``auto`` (``--out/--run-name``, else the newest run under ``--out``, with
    a complete checkpoint; None when there is none yet, so a first run starts fresh)."""
    if resume == "auto":
        if run_name:
            return latest(Path(out) / run_name)
        runs = [p for p in Path(out).glob("*") if latest(p)] if Path(out).is_dir() else []
        return latest(max(runs, key=lambda p: latest(p).stat().st_mtime)) if runs else None
    path = Path(resume)
    if (path / "manifest.json").is_file():
        return path
    if latest(path):
        return latest(path)
    if path.is_dir() and path.name.startswith("step-"):
        raise CheckpointError(f"{path} is incomplete (no manifest.json: it was interrupted); "
                              f"resume from {path.parent} to use its latest complete checkpoint")
    raise CheckpointError(f"no checkpoint at {path}; pass RUN_DIR, RUN_DIR/checkpoints/step-N "
                          f"or --resume auto")


def read_manifest(ckpt: Path) -> dict:
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{ckpt}/manifest.json is unreadable ({exc}); use an earlier checkpoint"
        ) from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt} has format version {manifest.get('format_version')}, this "
                              f"mpi_easgd reads version {FORMAT_VERSION}")
    return manifest


# Settings that change what training computes: a resume must keep them (the others, such as
# --epochs, --checkpoint-every or --worker-timeout, may change from one segment to the next).
TRAINING_KEYS = ("algo", "model", "dataset", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "tau",
                 "alpha", "outer_lr", "outer_momentum", "outer_delay", "exchange_dtype", "topk_fraction",
                 "fragments", "overlap_steps", "mixing", "overlap_exchange", "max_staleness", "seed", "uneven",
                 "augment")
ALGORITHM_KEYS = ("tau", "alpha", "outer_lr", "outer_momentum", "outer_delay", "exchange_dtype", "topk_fraction",
                  "fragments", "overlap_steps", "mixing", "overlap_exchange", "max_staleness")  # where used


def _uses(algo: str) -> frozenset[str] | None:
    """The settings ``algo`` uses (None: unknown, as for a rule that no longer imports)."""
    from mpi_easgd import registry

    try:
        return registry.lookup(algo).uses
    except Exception:  # noqa: BLE001 - a checkpoint's algorithm may be a user's rule that is gone
        return None


def _relevant(key: str, uses: list[frozenset[str] | None]) -> bool:
    """Whether ``key`` changes training for every algorithm whose settings are ``uses``
    (an algorithm's own setting counts only where it is used: sgd has no alpha)."""
    return key not in ALGORITHM_KEYS or all(u is None or key in u for u in uses)


def check_fits(manifest: dict, config: dict, world_size: int, ckpt: Path, at_saved_size: dict | None = None) -> None:
    """Refuse a checkpoint whose run differs from this one in a setting that changes
    training (:data:`TRAINING_KEYS`, resolved values), or that has gone past this run's
    ``--epochs``; the message names each difference and the way on. ``at_saved_size``:
    this run's configuration resolved for the checkpoint's number of workers, to compare
    when the size changed (a default that follows it, as alpha, follows it); without it a
    change of size is refused."""
    saved = manifest["config"]
    if manifest["world_size"] != world_size:
        if at_saved_size is None:
            raise CheckpointError(
                f"checkpoint {ckpt} was written by {manifest['world_size']} ranks, this run has {world_size}; "
                f"resume with mpirun -np {manifest['world_size']}")
        config = dict(at_saved_size, epochs=config["epochs"])
    uses = {algo: _uses(algo) for algo in (saved["algo"], config["algo"])}
    differ = [k for k in TRAINING_KEYS if k in saved and _relevant(k, list(uses.values())) and saved[k] != config[k]]
    if differ:
        def flags(values: dict) -> str:  # (each side's settings as its algorithm uses them)
            return " ".join(f"--{k.replace('_', '-')} {values[k]}" for k in differ
                            if _relevant(k, [uses[values["algo"]]]))

        raise CheckpointError(
            f"checkpoint {ckpt} is from {flags(saved)}, this run has {flags(config)}; resume with "
            f"{flags(saved)} or start a new run (another --run-name, or no --resume)"
            + ("; the number of ranks may change" if at_saved_size is not None else "")
        )
    reached = manifest.get("epoch", 0) + bool(manifest.get("step"))  # sync: the epoch it is in
    if not manifest.get("finished") and reached > config["epochs"]:
        raise CheckpointError(f"checkpoint {ckpt} is in epoch {reached}, past --epochs {config['epochs']}; "
                              f"resume with --epochs {reached} or more")


def finished(manifest: dict, epochs: int) -> bool:
    """Whether the checkpoint ends a run that already trained ``epochs`` epochs or more
    (resuming it would only rewrite its results)."""
    return bool(manifest.get("finished")) and manifest["config"]["epochs"] >= epochs


def save_model(model: torch.nn.Module, path: Path) -> None:
    """The trained model of a run (``model.pt``, or ``center.pt`` for async): its state dict,
    written atomically; load it with ``model.load_state_dict(torch.load(path))``."""
    write_atomic(path, lambda fh: torch.save(model.state_dict(), fh))


def load_rank(ckpt: Path, rank: int, mmap: bool = False) -> dict:
    """This rank's saved state; a clear error for a missing, truncated or corrupted file.
    ``mmap``: its tensors are mapped from the file, read only where used."""
    path = rank_file(ckpt, rank)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, use an earlier one")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means a damaged file
        raise CheckpointError(f"{path} is corrupted or truncated ({type(exc).__name__}); "
                              f"resume from an earlier checkpoint") from None
