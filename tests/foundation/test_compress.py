"""The codecs below 16 bits and error feedback (:mod:`mpi_easgd.compress`), in this process."""

from __future__ import annotations

import pytest
import torch

from mpi_easgd import compress
from mpi_easgd.compress import DeltaSender, Int4, Int8, StateReceiver, StateSender, TopK, message_buffer

CODECS = [Int8(), Int4(), TopK(0.02)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def roundtrip(codec, x):
    buf = message_buffer(codec, x.numel(), x.device)
    codec.encode(x, buf)
    return codec.decode(buf, torch.empty_like(x)), buf


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 255, 256, 257, 4096 * 2 + 3, 50_000])
@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_error_within_the_format_bound(codec, n, device):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(device) * 3
    y, buf = roundtrip(codec, x)
    assert buf.numel() == codec.nbytes(n) and y.dtype == torch.float32
    rows = torch.nn.functional.pad(x, (0, codec.rows(n) * codec.row - n)).view(-1, codec.row)
    err = torch.nn.functional.pad(x - y, (0, codec.rows(n) * codec.row - n)).view(-1, codec.row)
    top = rows.abs().amax(1, keepdim=True)
    if isinstance(codec, Int8):  # half a step of the block's scale (bfloat16-rounded: 1% slack)
        assert bool((err.abs() <= top / codec.levels * 0.5 * 1.01 + 1e-12).all())
    else:  # top-k: at most k entries per chunk, each within half the kept range; no sign flipped
        assert int((y != 0).sum()) <= codec.k * codec.rows(n)
        kept = (y != 0).view(-1)
        width = top.expand_as(rows).reshape(-1)[:n]
        assert bool((err.view(-1)[:n][kept].abs() <= width[kept] / 2 * 1.01).all())
        assert bool((x[kept] * y[kept] > 0).all())


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_zeros_and_exact_values_survive(codec):
    y, _ = roundtrip(codec, torch.zeros(1000))
    assert torch.equal(y, torch.zeros(1000))
    x = torch.zeros(1000)
    x[7], x[500] = 2.0, -2.0  # the block's extremes are exact
    y, _ = roundtrip(codec, x)
    assert float(y[7]) == pytest.approx(2.0, rel=1e-2) and float(y[500]) == pytest.approx(-2.0, rel=1e-2)


def test_sizes_against_float32():
    n = 11_000_000  # the 11 M-parameter model of the benchmarks
    assert Int8().nbytes(n) / (4 * n) <= 1 / 3.9
    assert Int4().nbytes(n) / (4 * n) <= (4 + 16 / 256) / 32 + 1e-6  # 4 bits, and a bfloat16 scale per 256
    assert TopK(0.02).nbytes(n) / (4 * n) <= 1 / 50
    assert TopK(0.01).nbytes(n) < TopK(0.03).nbytes(n)


def test_decoding_is_deterministic_and_bitwise_repeatable():
    x = torch.randn(10_000)
    for codec in CODECS:
        _, buf = roundtrip(codec, x)
        a = codec.decode(buf, torch.empty(10_000))
        b = codec.decode(buf.clone(), torch.full((10_000,), float("nan")))
        assert torch.equal(a, b)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_error_feedback_keeps_the_running_sum(codec):
    """With feedback the receiver's running sum stays within one message's error of the
    sender's; without, the errors add up (what feedback is for)."""
    n, steps = 4096, 200
    gen = torch.Generator().manual_seed(1)
    drift = torch.randn(n, generator=gen) * 0.1  # a steady direction under noise, like gradients
    gaps = {}
    for feedback in (True, False):
        sender = DeltaSender(codec, n, feedback=feedback)
        buf = message_buffer(codec, n)
        sent = received = torch.zeros(n)
        gen.manual_seed(2)
        for _ in range(steps):
            x = drift + torch.randn(n, generator=gen)
            sent = sent + x
            sender.encode(x, buf)
            received = received + codec.decode(buf, torch.empty(n))
        gaps[feedback] = float((sent - received).norm() / sent.norm())
        if feedback:
            assert torch.allclose(sent - received, sender.residual, atol=1e-3), "the residual is exactly what is owed"
    assert gaps[True] < 0.25 * gaps[False], gaps


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_a_state_channel_converges_to_the_state(codec):
    n = 5000
    start = torch.randn(n)
    sender, receiver = StateSender(codec, start), StateReceiver(codec, start)
    buf = message_buffer(codec, n)
    state = start + 0.01 * torch.randn(n)
    for _ in range(60):  # a state that stops moving: the receiver's copy closes in on it
        held = sender.encode(state, buf)
        got = receiver.decode(buf)
        assert torch.equal(held, got), "both ends hold the same reference"
    assert float((got - state).norm() / (state - start).norm()) < 0.05


def test_names_and_errors():
    assert compress.codec("float16") is None and compress.codec("topk", 0.03).fraction == 0.03
    with pytest.raises(ValueError, match="fraction must be in"):
        TopK(0.9)
