"""Device placement and the choice of transfer path (pure; no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from mpi_easgd.transfer import MPIBuffer, cuda_aware, loaded_mpi_library, place, query_cuda_support, resolve_mode


@pytest.mark.parametrize("kind,role,local_rank,local_size,gpus,device,note", [
    ("cuda", "peer", 0, 4, 4, "cuda:0", ""),
    ("cuda", "peer", 3, 4, 4, "cuda:3", ""),
    ("cuda", "worker", 5, 8, 4, "cuda:1", "8 ranks share 4 GPU(s) on this node"),
    ("auto", "tester", 2, 3, 1, "cuda:0", "3 ranks share 1 GPU(s) on this node"),
    ("auto", "peer", 1, 2, 0, "cpu", ""),
    ("cpu", "peer", 1, 2, 8, "cpu", ""),
    ("cuda", "server", 0, 4, 4, "cpu", "the parameter server keeps the center on the CPU"),
])
def test_placement_by_node_local_rank(kind, role, local_rank, local_size, gpus, device, note):
    p = place(kind, role, local_rank, local_size, gpus)
    assert (p.device, p.note) == (device, note)


def test_cuda_requested_without_gpus_is_an_error():
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        place("cuda", "peer", 0, 1, 0)


def test_cuda_awareness_overrides_and_library_query():
    assert cuda_aware("yes") == (True, "--cuda-aware yes")
    assert cuda_aware("no") == (False, "--cuda-aware no")
    assert cuda_aware("auto", {"MPI_EASGD_CUDA_AWARE": "1"})[0] is True
    assert cuda_aware("auto", {"MPI_EASGD_CUDA_AWARE": "0"})[0] is False
    from mpi4py import MPI  # noqa: F401 - loads libmpi

    assert loaded_mpi_library() is not None
    assert query_cuda_support() is False  # the pip MPICH is not CUDA-aware
    aware, why = cuda_aware("auto", {})
    assert aware is False and "MPIX_Query_cuda_support() = 0" in why


def test_transfer_modes():
    assert resolve_mode("auto", "cpu") == "direct"
    assert resolve_mode("staged", "cpu") == "staged"
    with pytest.raises(ValueError, match="transfer mode"):
        resolve_mode("fast", "cpu")


def test_staged_buffer_copies_through_host_memory():
    t = torch.arange(6.0)
    buf = MPIBuffer(t, "staged")
    assert buf.mpi.ctypes.data != t.data_ptr(), "a separate host buffer"
    buf.before_send()
    assert buf.mpi.tolist() == t.tolist()
    buf.mpi[:] = 7.0  # as if MPI received into it
    assert t[0] == 0
    buf.after_recv()
    assert t.tolist() == [7.0] * 6
