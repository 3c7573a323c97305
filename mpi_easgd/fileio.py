"""Atomic file writes, the one way every file of a run or a dataset is written.

A file is written to a temporary name next to its destination, flushed to disk, given the
permissions any new file gets (0666 less the umask, so colleagues can read shared results
where the umask allows), and renamed over the destination: a reader never sees half a
file, and a failed or interrupted write leaves no temporary file behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path, unique: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it is fsynced,
    made readable as a new file would be, and renamed over ``path``; on failure removed.
    ``unique``: a per-process temporary name, for files that several processes may build
    at once (the last rename wins; each is complete)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp" if unique else f".{path.name}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(fh)`` into a binary file that appears at ``path`` only when complete."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda fh: fh.write(text.encode()))


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
