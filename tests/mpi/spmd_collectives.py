"""SPMD tests of AllReduceSGD and AllReduceEA: every rank runs every test.

Run under ``mpiexec -n K python -m mpi4py -m pytest tests/mpi/spmd_collectives.py`` (the
suite does so for K = 1, 2, 4 from ``tests/test_spmd.py``); ``python -m mpi4py``
turns a failure on one rank into MPI_Abort, so a failing rank cannot hang the others.
Each test compares what the ranks computed together against a serial computation that
every rank can do on its own with all ranks' data.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from mpi_easgd import AllReduceEA, AllReduceSGD, compress
from mpi_easgd.transfer import exchange_dtype

sys.path.insert(0, os.path.dirname(__file__))
from comm import comm_under_test, sent_with_feedback  # noqa: E402

COMM = comm_under_test()
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
torch.set_num_threads(1)


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def batch(rank: int, step: int, n: int = 8):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def params(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def assert_same_on_all_ranks(t: torch.Tensor) -> None:
    mine = t.detach().numpy().copy()
    root = mine.copy()
    COMM.Bcast(root, root=0)
    assert np.array_equal(mine, root), f"rank {RANK} differs from rank 0 (bitwise)"


def loss(m, xy):
    return nn.functional.cross_entropy(m(xy[0]), xy[1])


# The default; pieces of 16 values (6 Allreduces); and overlapped with backward in buckets of
# 16 values or more (2 buckets: the second layer and the count slot, 28 values; the first, 56).
@pytest.mark.parametrize(("chunk_bytes", "overlap"), [(None, False), (64, False), (64, True)])
def test_sgd_equals_one_process_on_concatenated_batches(chunk_bytes, overlap):
    local = model(seed=RANK)  # different on purpose: synchronize_parameters must fix that
    serial = model(seed=0)
    sgd = AllReduceSGD(COMM, chunk_bytes=chunk_bytes, overlap=overlap)
    sgd.synchronize_parameters(local)
    opt = torch.optim.SGD(local.parameters(), lr=0.1, momentum=0.9)
    opt_serial = torch.optim.SGD(serial.parameters(), lr=0.1, momentum=0.9)
    for step in range(5):
        opt.zero_grad()  # default set_to_none: exercises the gradient re-gather path
        loss(local, batch(RANK, step)).backward()
        assert sgd.sum_and_normalize_gradients(local) == SIZE
        opt.step()
        xs, ys = zip(*(batch(r, step) for r in range(SIZE)))
        opt_serial.zero_grad()
        loss(serial, (torch.cat(xs), torch.cat(ys))).backward()
        opt_serial.step()
    torch.testing.assert_close(params(local), params(serial), rtol=1e-5, atol=1e-6)
    assert_same_on_all_ranks(params(local))


def test_sum_gradients_sums_and_counts_contributors():
    m = model()
    sgd = AllReduceSGD(COMM)
    sgd.synchronize_parameters(m)
    flat = sgd.flat(m)
    flat.zero_grad()
    has_data = RANK % 2 == 0
    if has_data:
        loss(m, batch(RANK, 0)).backward()
    mine = flat.grad.clone()
    count = sgd.sum_gradients(m, has_data=has_data)
    assert count == (SIZE + 1) // 2
    expected = torch.zeros_like(mine)
    for r in range(0, SIZE, 2):
        ref = model()
        loss(ref, batch(r, 0)).backward()
        expected += torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    torch.testing.assert_close(flat.grad, expected, rtol=1e-5, atol=1e-6)
    assert sgd.steps == int(has_data)


@pytest.mark.parametrize("overlap", [False, True])
def test_sgd_uneven_endings_terminate_and_agree(overlap):
    """Rank r has r + 1 batches: each round averages over the ranks that still have data."""
    m, serial = model(), model()
    sgd = AllReduceSGD(COMM, overlap=overlap, chunk_bytes=64)
    sgd.synchronize_parameters(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt_serial = torch.optim.SGD(serial.parameters(), lr=0.1)
    rounds = 0
    while True:
        has_data = rounds < RANK + 1
        sgd.flat(m).zero_grad()
        if has_data:
            loss(m, batch(RANK, rounds)).backward()
        count = sgd.sum_and_normalize_gradients(m, has_data=has_data)
        if count == 0:
            break
        opt.step()
        opt_serial.zero_grad()
        grads = []
        for r in range(SIZE):
            if rounds < r + 1:
                ref = copy.deepcopy(serial)
                loss(ref, batch(r, rounds)).backward()
                grads.append([p.grad for p in ref.parameters()])
        for p, *gs in zip(serial.parameters(), *grads):
            p.grad = sum(gs) / len(gs)
        opt_serial.step()
        rounds += 1
    assert rounds == SIZE  # the slowest rank's count, on every rank
    assert sgd.steps == RANK + 1
    kept = sgd.synchronize_parameters(m)
    assert kept == SIZE - 1  # the rank that took the most steps
    assert_same_on_all_ranks(params(m))
    torch.testing.assert_close(params(m), params(serial), rtol=1e-5, atol=1e-6)


def _serial_ea(steps, tau, alpha, lr, have_data=lambda r, s: True, wire="float32"):
    """All ranks' EA in one process, written from the equations (no library code but the
    codec); each ``d`` travels as ``wire`` and their sum is rounded to it once per
    addition. A compressed format sends ``d`` plus the rank's residual (what its earlier
    messages left out); the center adds the decoded messages in rank order."""
    codec = compress.codec(wire)
    residuals = [0.0] * SIZE
    models = [model() for _ in range(SIZE)]
    opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in models]
    center = params(models[0]).clone()
    calls = 0
    for s in range(steps):
        for r, (m, o) in enumerate(zip(models, opts)):
            if have_data(r, s):
                o.zero_grad()
                loss(m, batch(r, s)).backward()
                o.step()
        calls += 1
        if calls % tau == 0:
            total = None
            for r, m in enumerate(models):
                x = params(m)
                d = alpha * (x - center)
                if codec is not None:
                    sent, residuals[r] = sent_with_feedback(codec, d, residuals[r])
                else:
                    sent = d.to(exchange_dtype(wire))
                total = sent if total is None else total + sent
                torch.nn.utils.vector_to_parameters(x - d, m.parameters())
            center = center + total.float()
    return [params(m) for m in models], center


def _run_ea(steps, tau, alpha, lr, has_data=lambda s: True, wire="float32"):
    m = model(seed=RANK)
    ea = AllReduceEA(COMM, tau, alpha, exchange_dtype=wire, chunk_bytes=64)  # several pieces, each summed alike
    ea.synchronize_parameters(m)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    for s in range(steps):
        if has_data(s):
            opt.zero_grad()
            loss(m, batch(RANK, s)).backward()
            opt.step()
        ea.average_parameters(m)
    return m, ea


@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16", "int8", "int4", "topk"])
def test_ea_matches_serial_simulation(wire):
    m, ea = _run_ea(steps=7, tau=2, alpha=0.3, lr=0.2, wire=wire)
    xs, center = _serial_ea(steps=7, tau=2, alpha=0.3, lr=0.2, wire=wire)
    assert ea.rounds == 3
    if compress.codec(wire):  # gathered and added in rank order: the same bits everywhere
        assert_same_on_all_ranks(ea.center)
    # the 16-bit sum's rounding depends on the library's reduction order beyond 2 ranks
    tol = 1e-6 if wire not in ("float16", "bfloat16") or SIZE <= 2 else 1e-3
    torch.testing.assert_close(params(m), xs[RANK], rtol=1e-5, atol=tol)
    torch.testing.assert_close(ea.center, center, rtol=1e-5, atol=tol)
    if SIZE > 1:
        assert not torch.equal(xs[0], xs[1]), "ranks must really differ for this test to bite"


def test_ea_center_becomes_the_average_with_alpha_one_over_p():
    """tau = 1, alpha = 1/p: after the first round the center is the mean of the x_i
    (taken after the local step, before the elastic move)."""
    m = model()
    ea = AllReduceEA(COMM, 1, 1.0 / SIZE if SIZE > 1 else 0.5)
    ea.synchronize_parameters(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    opt.zero_grad()
    loss(m, batch(RANK, 0)).backward()
    opt.step()
    stepped = params(m).clone()
    mean = stepped.numpy().copy()
    COMM.Allreduce(MPI.IN_PLACE, mean)
    mean /= SIZE
    ea.average_parameters(m)
    if SIZE > 1:
        torch.testing.assert_close(ea.center, torch.from_numpy(mean), rtol=1e-5, atol=1e-6)


def test_ea_center_identical_after_synchronize_center():
    m, ea = _run_ea(steps=4, tau=1, alpha=0.2, lr=0.1)
    ea.center[0] += 1e-6 * RANK  # simulate floating-point drift between the copies
    ea.synchronize_center(m)
    assert_same_on_all_ranks(ea.center)


def test_ea_uneven_endings_keep_the_rounds_matched():
    """Rank r has data for 3 + r steps; all ranks run to the longest; centers agree."""
    steps = 3 + SIZE - 1
    m, ea = _run_ea(steps=steps, tau=2, alpha=0.25, lr=0.2, has_data=lambda s: s < 3 + RANK)
    xs, center = _serial_ea(steps, 2, 0.25, 0.2, have_data=lambda r, s: s < 3 + r)
    torch.testing.assert_close(params(m), xs[RANK], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ea.center, center, rtol=1e-5, atol=1e-6)
    ea.synchronize_center(m)
    assert_same_on_all_ranks(ea.center)


def test_ea_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="tau must be an integer >= 1"):
        AllReduceEA(COMM, 0, 0.1)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        AllReduceEA(COMM, 1, 1.0)


@pytest.mark.skipif(SIZE < 2, reason="DDP needs 2+ processes")
@pytest.mark.parametrize("overlap", [False, True])
def test_sgd_equals_pytorch_ddp(overlap):
    """Same initial model, same batches: AllReduceSGD and DDP (gloo) end equal."""
    with gloo():
        ddp = nn.parallel.DistributedDataParallel(model())
        ours = model()
        sgd = AllReduceSGD(COMM, overlap=overlap, chunk_bytes=64)
        sgd.synchronize_parameters(ours)
        opt_d = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        opt_o = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
        for step in range(5):
            xy = batch(RANK, step)
            opt_d.zero_grad()
            loss(ddp, xy).backward()
            opt_d.step()
            sgd.flat(ours).zero_grad()
            loss(ours, xy).backward()
            sgd.sum_and_normalize_gradients(ours)
            opt_o.step()
        torch.testing.assert_close(params(ours), params(ddp.module), rtol=1e-5, atol=1e-6)


@contextlib.contextmanager
def gloo():
    """torch.distributed (gloo) on the same ranks, for the tests that compare with torch.
    A file to meet at, not a TCP port: a port found free and handed on may be taken by
    another job meanwhile (EADDRINUSE was seen with the suite's other launches)."""
    import torch.distributed as dist

    folder = COMM.bcast(tempfile.mkdtemp(prefix="mpi_easgd-gloo-") if RANK == 0 else None, root=0)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=RANK, world_size=SIZE)
    try:
        yield
    finally:
        dist.destroy_process_group()
        COMM.Barrier()
        if RANK == 0:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("algo", ["sgd", "sgd-overlap", "ea"])
def test_staged_transfers_give_bitwise_the_same_result(algo):
    """The host-staged path (what a non-CUDA-aware MPI uses for GPU tensors) on CPU; with
    overlap each bucket is staged on its own."""
    results = []
    for transfer in ("direct", "staged"):
        m = model(seed=RANK)
        if algo == "ea":
            a = AllReduceEA(COMM, 2, 0.3, transfer=transfer)
        else:
            a = AllReduceSGD(COMM, transfer=transfer, overlap=algo == "sgd-overlap", chunk_bytes=64)
        a.synchronize_parameters(m)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for step in range(5):
            opt.zero_grad()
            loss(m, batch(RANK, step)).backward()
            if algo != "ea":
                a.sum_and_normalize_gradients(m)
                opt.step()
            else:
                opt.step()
                a.average_parameters(m)
        if algo == "ea":
            a.synchronize_center(m)
        results.append(params(m))
    assert torch.equal(*results)


def test_sgd_overlap_starts_reductions_during_backward():
    """With overlap=True the buckets' reductions start from gradient hooks: both buckets
    (28 and 56 values, 2 + 4 pieces) have started when backward returns; a second backward before the sum is refused."""
    m = model()
    sgd = AllReduceSGD(COMM, overlap=True, chunk_bytes=64)
    sgd.synchronize_parameters(m)
    reducer = sgd._reducer
    assert [len(b.mpi) for b in reducer.buffers] == [28, 56]
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt.zero_grad()
    loss(m, batch(RANK, 0)).backward()
    assert reducer.started == 2 and reducer.issued >= 1  # before sum_and_normalize_gradients
    assert sgd.sum_and_normalize_gradients(m) == SIZE
    sgd.flat(m).zero_grad()
    loss(m, batch(RANK, 1)).backward()
    with pytest.raises(RuntimeError, match="once per step"):
        loss(m, batch(RANK, 2)).backward()


def test_plan_calibration_measures_the_same_constants_on_every_rank():
    """mpi_easgd.plan's calibration (ranks 0 and 1 measure, every rank gets the result);
    benchmarks/plan_validation.py compares the model it feeds with measured runs."""
    from mpi_easgd.plan import calibrate

    if SIZE < 2:
        pytest.skip("the calibration measures between two ranks")
    m = calibrate(COMM, params=1 << 16, repeats=2)
    assert COMM.allgather(m) == [m] * SIZE
    assert 0 < m.latency < 0.01 and 1e8 < m.bandwidth < 1e12, m  # shared memory or loopback
    assert m.reduce >= 0 and 0 < m.server_update < 1e-7 and 0 < m.worker_update < 1e-7, m


@pytest.mark.skipif(SIZE < 2, reason="averaging needs 2+ processes")
def test_hierarchical_averaging_equals_torch_hierarchical_model_averager():
    """The same models, batches and schedule: HierarchicalAveraging on MPI and torch's
    HierarchicalModelAverager on gloo give the same parameters after every step (4 ranks:
    pairs every 2 steps, all every 4 after 3 warm-up steps; 2 ranks: all every 3)."""
    from collections import OrderedDict

    from torch.distributed.algorithms.model_averaging.hierarchical_model_averager import HierarchicalModelAverager

    from mpi_easgd.collectives.hierarchical import HierarchicalAveraging

    levels, warmup = (OrderedDict([(2, 2), (4, 4)]), 3) if SIZE == 4 else (OrderedDict([(3, SIZE)]), 0)
    with gloo():
        theirs, ours = model(), model()
        torch_avg = HierarchicalModelAverager(levels, warmup_steps=warmup)
        with HierarchicalAveraging(COMM, dict(levels), warmup_steps=warmup) as avg:
            avg.synchronize_parameters(ours)
            opt_t = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
            opt_o = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
            averaged = []
            for step in range(9):
                xy = batch(RANK, step)
                for m, opt in ((theirs, opt_t), (ours, opt_o)):
                    opt.zero_grad()
                    loss(m, xy).backward()
                    opt.step()
                torch_avg.average_parameters(theirs.parameters())
                averaged.append(avg.average_parameters(ours))
                torch.testing.assert_close(params(ours), params(theirs), rtol=0, atol=1e-6)
                if SIZE == 4 and step == 6:  # pairs averaged: equal within a pair, not across
                    sums = COMM.allgather(float(params(ours).double().sum()))
                    assert sums[0] == sums[1] and sums[2] == sums[3] and sums[0] != sums[2], sums
        if SIZE == 4:
            assert averaged == [False, False, False, False, True, False, True, False, True]  # steps 4, 6, 8
            assert avg.averages == [1, 2]  # pairs at 6; everyone at 4 and 8
        else:
            assert averaged == [True, False, False, True, False, False, True, False, False]


@pytest.mark.parametrize("groups", ["1", "2", "node"])
def test_workers_are_grouped_by_size_or_by_node(groups):
    """mpi_easgd.ps.groups.make_groups on every rank: ranks 1.. are the workers; with
    --groups 2 consecutive pairs, with node every worker of this machine in one group."""
    from mpi_easgd.ps.groups import make_groups

    workers = list(range(1, SIZE))
    comm, leaders = make_groups(COMM, workers, groups)
    expected = {"1": workers, "2": workers[::2], "node": workers[:1]}[groups]
    assert leaders == expected
    if RANK in workers and groups != "1":
        size = {"2": 2 if workers.index(RANK) // 2 * 2 + 1 < len(workers) else 1, "node": len(workers)}[groups]
        assert comm.Get_size() == size and (comm.Get_rank() == 0) == (RANK in leaders)
        comm.Free()
    else:
        assert comm is None
