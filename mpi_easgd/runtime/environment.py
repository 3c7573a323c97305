"""What a run ran on, for its summary: versions (mpi_easgd and its git commit when it has
one, Python, torch, numpy, mpi4py, the MPI library), the hosts of its ranks, and threads."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def git_commit(folder: Path) -> str | None:
    """The commit checked out at ``folder`` (with ``-dirty`` when files differ), or None
    when it is no git checkout (an installed wheel) or git is missing."""
    try:
        out = subprocess.run(["git", "-C", str(folder), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def describe(hosts: list[str]) -> dict:
    """The environment of a run whose ranks ran on ``hosts`` (one entry per rank)."""
    import mpi4py
    import numpy
    import torch
    from mpi4py import MPI

    import mpi_easgd

    levels = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled", MPI.THREAD_SERIALIZED: "serialized",
              MPI.THREAD_MULTIPLE: "multiple"}
    return dict(
        mpi_easgd=mpi_easgd.__version__, git_commit=git_commit(Path(mpi_easgd.__file__).resolve().parent),
        python=platform.python_version(), torch=torch.__version__, numpy=numpy.__version__,
        mpi4py=mpi4py.__version__, mpi_library=MPI.Get_library_version().splitlines()[0].strip(),
        mpi_thread_level=levels.get(MPI.Query_thread(), str(MPI.Query_thread())),
        ranks=len(hosts), hosts=sorted(set(hosts)), ranks_per_host={h: hosts.count(h) for h in sorted(set(hosts))},
        torch_threads=torch.get_num_threads(), cuda=torch.version.cuda,
    )
