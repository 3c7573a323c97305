"""GPU self-test: run on a GPU node as ``mpiexec -n 2 python -m mpi4py jobs/gpu_selftest.py``.

Checks, for every transfer path this MPI supports (staged always; direct only when the
library is CUDA-aware): AllReduceSGD and AllReduceEA on CUDA tensors, and compressed rounds
(AllReduceEA in int4, streaming AllReduceDiLoCo in top-k), leave every rank with bitwise
the same parameters (or center); then measures the staged path's host round trip against a
raw device-to-host copy, and the codecs' speed on the GPU.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpi_easgd import AllReduceDiLoCo, AllReduceEA, AllReduceSGD, compress
from mpi_easgd.transfer import MPIBuffer, cuda_aware, place

comm = MPI.COMM_WORLD
local = comm.Split_type(MPI.COMM_TYPE_SHARED)
device = torch.device(place("cuda", "peer", local.Get_rank(), local.Get_size(), torch.cuda.device_count()).device)
torch.cuda.set_device(device)
aware, why = cuda_aware("auto")
modes = ["staged"] + (["direct"] if aware else [])
say = print if comm.rank == 0 else (lambda *a, **k: None)
say(f"{comm.size} ranks; rank 0 on {device} ({torch.cuda.get_device_name(device)}); CUDA-aware MPI: {aware} ({why})")


def same_on_all_ranks(t: torch.Tensor) -> bool:
    mine = t.detach().cpu().numpy().copy()
    root = mine.copy()
    comm.Bcast(root, root=0)
    return bool(comm.allreduce(int(np.array_equal(mine, root)), op=MPI.MIN))


MAKE = {"sgd": lambda mode: AllReduceSGD(comm, transfer=mode),
        "ea": lambda mode: AllReduceEA(comm, 2, 0.3, transfer=mode),
        "ea-int4": lambda mode: AllReduceEA(comm, 2, 0.3, transfer=mode, exchange_dtype="int4"),
        "diloco-topk-streaming": lambda mode: AllReduceDiLoCo(comm, 4, transfer=mode, exchange_dtype="topk",
                                                               fragments=2, overlap_steps=1)}
for mode in modes:
    for name, make in MAKE.items():
        torch.manual_seed(comm.rank)  # different on purpose: synchronize must fix it
        model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)).to(device)
        algo = make(mode)
        algo.synchronize_parameters(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(10):
            x = torch.randn(64, 256, device=device, generator=torch.Generator(device).manual_seed(step + comm.rank))
            opt.zero_grad()
            model(x).square().mean().backward()
            if name == "sgd":
                algo.sum_and_normalize_gradients(model)
                opt.step()
            else:
                opt.step()
                algo.average_parameters(model)
        if name == "sgd":
            ok = same_on_all_ranks(torch.cat([p.reshape(-1) for p in model.parameters()]))
        else:
            algo.synchronize_center(model)
            ok = same_on_all_ranks(algo.center)
        say(f"  {name:<22} {mode:<7} parameters equal across ranks: {'OK' if ok else 'FAILED'}")
        assert ok

n = 64 << 20  # 256 MB of float32
t = torch.randn(n // 4, device=device)
staged = MPIBuffer(t, "staged")
host = torch.empty_like(t, device="cpu")  # pageable, like a naive .cpu()
for label, fn in (("staged round trip (pinned, both ways)", lambda: (staged.before_send(), staged.after_recv())),
                  ("raw device-to-host copy (pageable, one way)", lambda: host.copy_(t))):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 5
    say(f"  {label:<44} {n / seconds / 1e9:6.1f} GB/s of buffer")
x = torch.randn(11_000_000, device=device)
out = torch.empty_like(x)
for name in ("int8", "int4", "topk"):
    codec = compress.codec(name)
    buf = compress.message_buffer(codec, x.numel(), device)
    codec.encode(x, buf)
    for what, fn in (("encode", lambda c=codec, b=buf: c.encode(x, b)),
                     ("decode", lambda c=codec, b=buf: c.decode(b, out))):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        rate = 4 * x.numel() * 5 / (time.perf_counter() - start) / 1e9
        say(f"  {name} {what} on the GPU (11 M entries) {rate:7.1f} GB/s")
say("GPU self-test passed")
