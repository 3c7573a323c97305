"""How tensors reach MPI, and which device each rank uses.

- **Transfer mode.** ``direct``: MPI reads the tensor's own memory (a numpy view on CPU; the
  device pointer on a GPU, which needs a CUDA-aware MPI). ``staged``: through a host buffer
  allocated once (pinned for GPUs), one copy each way; always works. ``auto`` picks direct
  for CPU tensors and, for GPU tensors, direct only when the MPI library says it is
  CUDA-aware (``MPIX_Query_cuda_support``) or ``MPI_EASGD_CUDA_AWARE=1`` says so.
- **MPI buffers.** :class:`MPIBuffer` is what mpi4py is handed for a tensor in either mode:
  a zero-copy numpy view for CPU tensors (mpi4py's numpy path costs ~5 us a call against
  ~20 us through DLPack), the device tensor itself when the MPI library is CUDA-aware, or
  a pinned host copy allocated once when it is not.
- **Exchange dtype.** A buffer may travel in a narrower floating type than it is kept in
  (``wire``: float16 or bfloat16 for float32 tensors): it is then staged through a host
  buffer of that type (the cast is the copy), and reductions use :func:`sum_op`, which adds
  in float32 and rounds once (MPICH has no bfloat16 sum; Open MPI's returns garbage).
- **Pipelined reductions.** :func:`allreduce` sums a large buffer as a loop of Allreduces of
  ``chunk_bytes`` each (default 4 MiB; ``$MPI_EASGD_CHUNK_BYTES`` or the algorithms'
  ``chunk_bytes=`` override it; 0: one call). Measured with the MPICH wheel, 2 ranks, one
  node: an 11 M-parameter (44 MB) buffer took 31.8 ms in one Allreduce and 10.9-11.9 ms in 1-4
  MB pieces (8 MB: 14.8 ms); below 4 MB nothing changes. Broadcasts gained nothing from
  pieces (8.6 ms whole, 8.1-10.1 ms in pieces) and stay whole.
- **Placement.** One GPU per rank by node-local rank (from a shared-memory split of the
  communicator), modulo the GPUs visible to the process (``CUDA_VISIBLE_DEVICES`` is
  honoured by torch). The async server stays on the CPU.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch
from mpi4py import MPI

from mpi_easgd.flat import flat_buffer

ENV_CUDA_AWARE = "MPI_EASGD_CUDA_AWARE"
ENV_CHUNK = "MPI_EASGD_CHUNK_BYTES"
CHUNK_BYTES = 4 << 20  # measured (module docstring); larger pieces amortise a network's latency
MODES = ("auto", "direct", "staged")
EXCHANGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def exchange_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype for ``float32``/``float16``/``bfloat16`` (or that dtype itself)."""
    dtype = EXCHANGE_DTYPES.get(name) if isinstance(name, str) else name
    if dtype not in EXCHANGE_DTYPES.values():
        raise ValueError(f"exchange_dtype must be one of {', '.join(EXCHANGE_DTYPES)}; got {name!r}")
    return dtype


def mpi_view(tensor: torch.Tensor):
    """A CPU tensor as mpi4py takes it: a numpy view; 16-bit floats as int16 (numpy has no
    bfloat16, and MPI only moves their bytes: :func:`sum_op` does the arithmetic)."""
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


def chunk_size(chunk_bytes: int | None = None, environ=os.environ) -> int:
    """The piece size of :func:`allreduce` in bytes: ``chunk_bytes``, else
    ``$MPI_EASGD_CHUNK_BYTES``, else :data:`CHUNK_BYTES`; 0 means one piece. Every rank must
    use the same size (a different one is a different sequence of collectives)."""
    if chunk_bytes is None:
        value = environ.get(ENV_CHUNK, "")
        try:
            chunk_bytes = int(value) if value else CHUNK_BYTES
        except ValueError:
            raise ValueError(f"${ENV_CHUNK} must be a number of bytes (0: no pieces); got {value!r}") from None
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 0:
        raise ValueError(f"chunk_bytes must be an integer >= 0 (0: no pieces); got {chunk_bytes!r}")
    return chunk_bytes


def _pieces(buf: MPIBuffer, chunk_bytes: int) -> list:
    """``buf.mpi`` in pieces of ``chunk_bytes`` (0: one piece)."""
    mpi = buf.mpi
    n = len(mpi)
    itemsize = mpi.itemsize if hasattr(mpi, "itemsize") else mpi.element_size()
    step = max(1, chunk_bytes // itemsize) if chunk_bytes else n
    if n <= step:  # the common small case: no slice to make
        return [mpi]
    return [mpi[start:start + step] for start in range(0, n, step)]


def allreduce(comm: MPI.Comm, buf: MPIBuffer, chunk_bytes: int) -> None:
    """Sum ``buf.mpi`` over ``comm`` in place with ``buf.op``, in pieces of ``chunk_bytes``
    (0: one call); the caller does ``before_send`` / ``after_recv``."""
    for piece in _pieces(buf, chunk_bytes):
        comm.Allreduce(MPI.IN_PLACE, piece, op=buf.op)


def iallreduce(comm: MPI.Comm, buf: MPIBuffer, chunk_bytes: int) -> list[MPI.Request]:
    """:func:`allreduce` started, not waited for: one nonblocking reduction per piece."""
    return [comm.Iallreduce(MPI.IN_PLACE, piece, op=buf.op) for piece in _pieces(buf, chunk_bytes)]


_SUM_OPS: dict[torch.dtype, MPI.Op] = {}


def sum_op(dtype: torch.dtype) -> MPI.Op:
    """``MPI.SUM``, or for a 16-bit float buffer (handed to MPI as int16, :func:`mpi_view`)
    a user-defined sum that adds in float32 and rounds once to ``dtype`` (torch's CPU
    kernels for half types compute in float32)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return MPI.SUM
    if dtype not in _SUM_OPS:
        def add(inbuf, inoutbuf, datatype) -> None:
            if len(inbuf):
                torch.frombuffer(inoutbuf, dtype=dtype).add_(torch.frombuffer(inbuf, dtype=dtype))

        _SUM_OPS[dtype] = MPI.Op.Create(add, commute=True)
    return _SUM_OPS[dtype]


def loaded_mpi_library() -> str | None:
    """Path of the libmpi this process has loaded (Linux), or None."""
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                path = line.split()[-1]
                if "/libmpi" in path and ".so" in path:
                    return path
    except OSError:
        pass
    return None


def query_cuda_support() -> bool | None:
    """What the MPI library says about CUDA-awareness (MPICH and Open MPI have
    ``MPIX_Query_cuda_support``); None when it cannot be asked."""
    path = loaded_mpi_library()
    if path is None:
        return None
    try:
        return bool(ctypes.CDLL(path).MPIX_Query_cuda_support())
    except (OSError, AttributeError):
        return None


def cuda_aware(setting: str = "auto", environ=os.environ) -> tuple[bool, str]:
    """(CUDA-aware?, why): ``yes``/``no`` force it; ``auto`` reads ``$MPI_EASGD_CUDA_AWARE``
    (1/0), then asks the library."""
    if setting in ("yes", "no"):
        return setting == "yes", f"--cuda-aware {setting}"
    env = environ.get(ENV_CUDA_AWARE, "")
    if env in ("0", "1"):
        return env == "1", f"{ENV_CUDA_AWARE}={env}"
    answer = query_cuda_support()
    if answer is None:
        return False, "the MPI library cannot be asked (assumed not CUDA-aware)"
    return answer, f"MPIX_Query_cuda_support() = {int(answer)}"


def resolve_mode(mode: str, device_type: str, setting: str = "auto") -> str:
    """``direct`` or ``staged`` for a tensor on ``device_type`` (``cpu``/``cuda``)."""
    if mode not in MODES:
        raise ValueError(f"transfer mode must be one of {', '.join(MODES)}; got {mode!r}")
    if mode != "auto":
        return mode
    if device_type == "cpu":
        return "direct"
    return "direct" if cuda_aware(setting)[0] else "staged"


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu" or "cuda:N"
    note: str  # what to tell the user (sharing, fallbacks)


def place(kind: str, role: str, local_rank: int, local_size: int, gpus: int) -> Placement:
    """The device of a rank: ``kind`` is cpu, cuda or auto; ``gpus`` the visible GPU count."""
    if role == "server":
        return Placement("cpu", "the parameter server keeps the center on the CPU")
    if kind == "cpu" or (kind == "auto" and gpus == 0):
        return Placement("cpu", "")
    if gpus == 0:
        raise ValueError("--device cuda but no CUDA device is visible; use --device cpu or auto")
    note = ""
    if local_size > gpus:
        note = f"{local_size} ranks share {gpus} GPU(s) on this node"
    return Placement(f"cuda:{local_rank % gpus}", note)


class MPIBuffer:
    """What MPI reads and writes for a tensor, and the copies around the call.

    ``buf.mpi`` is handed to mpi4py, with ``buf.op`` for reductions. Call
    ``buf.before_send()`` before MPI reads it and ``buf.after_recv()`` after MPI wrote into
    it. ``mode`` (see :mod:`mpi_easgd.transfer`): ``direct`` hands MPI the tensor's memory
    (no copies); ``staged`` goes through a host buffer allocated once (pinned for GPU
    tensors), on any device, so the staged logic runs on CPU-only machines too. ``wire``: the
    floating type on the wire (default: the tensor's); a narrower one is always staged, the
    cast being the copy, and :attr:`sent` is what MPI reads.
    """

    def __init__(self, tensor: torch.Tensor, mode: str = "auto", wire: torch.dtype | None = None) -> None:
        if not tensor.is_contiguous():
            # MPI would read the storage in memory order, not the logical order.
            raise ValueError("MPI buffers must be contiguous tensors")
        self.tensor = tensor
        self.on_gpu = tensor.device.type != "cpu"
        self.wire = tensor.dtype if wire is None else wire
        self.mode = "staged" if self.wire != tensor.dtype else resolve_mode(mode, tensor.device.type)
        self.op = sum_op(self.wire)
        if self.mode == "staged":
            if self.on_gpu:
                self._host = torch.empty(tensor.shape, dtype=self.wire, pin_memory=True)
            else:
                self._host = flat_buffer(tensor.numel()).view(tensor.shape).to(self.wire)
            self.sent = self._host
            self.mpi = mpi_view(self._host)
        elif self.on_gpu:
            self.sent = self.mpi = tensor.detach()  # a CUDA-aware MPI reads device memory itself
        else:
            self.sent = tensor.detach()
            self.mpi = mpi_view(self.sent)

    def before_send(self) -> None:
        if self.mode == "staged":
            self._host.copy_(self.tensor)  # synchronous: the data is on the host after this
        elif self.on_gpu:
            torch.cuda.current_stream(self.tensor.device).synchronize()  # mpi4py will not

    def after_recv(self) -> None:
        if self.mode == "staged":
            self.tensor.copy_(self._host)
