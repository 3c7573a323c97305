"""Exchanges below 16 bits: int8, int4 and top-k codecs, and error feedback.

A :class:`Codec` turns a float32 vector into a fixed number of bytes and back. Every
message of one codec and length has the same size, so the receiver posts its buffer
before the message exists, and a synchronous round gathers all ranks' messages with one
``Allgather``. Each codec works on rows of the vector (blocks or chunks, the last one
zero-padded) and writes its regions one after another, every region aligned:

- :class:`Int8` and :class:`Int4`: a bfloat16 scale per block of ``block`` entries (the
  block's largest magnitude over 127, or over 7), then the rounded values (4-bit ones two
  to a byte). int4 is 4 + 16 / block bits per entry: 1/7.88 of float32 at block 256. No
  format with a scale per block reaches 1/8 exactly; this one misses it by the scales.
- :class:`TopK`: per chunk of ``chunk`` entries (at most 32768, so that an index is an
  int16), the ``k = ceil(fraction * chunk)`` entries of largest magnitude (rounded up to a
  multiple of 4): their indices, 2 bits per value (sign, and which half of the kept range
  of magnitudes it is in) and two bfloat16 magnitudes, the mean of each half. At 2% that
  is 1/87 of float32.

Decoding is deterministic and element-wise (top-k: a scatter to distinct indices), so every
rank that decodes the same bytes gets bitwise the same floats. Everything is torch
operations: the same code runs on CPU and GPU tensors.

Rounding and dropping are biased, so what a message left out must not be lost. Two
senders keep it, both *error feedback*:

- :class:`DeltaSender`, for messages that are increments (DOWNPOUR's update, a
  pseudo-gradient, an elastic difference): it adds what earlier messages left out to the
  next one, so that the receiver's running sum stays within one message's error of the
  sender's (Seide et al. 2014; Karimireddy et al. 2019);
- :class:`StateSender` and :class:`StateReceiver`, for messages that are a state (a
  worker's parameters, the center): both ends keep the same *reference*, the state as the
  receiver knows it; the sender sends the difference from it and both add what was sent.
  This is error feedback on the state's increments: what was left out is still in the
  difference the next time. It costs one float32 copy of the model per channel on each end.
"""

from __future__ import annotations

import abc
import math

import torch

from mpi_easgd.transfer import exchange_dtype

TOPK_FRACTION = 0.02


def _align(offset: int, to: int = 8) -> int:
    return -(-offset // to) * to


class Codec(abc.ABC):
    """A float32 vector of ``n`` entries as :meth:`nbytes` bytes (module docstring)."""

    name: str
    row: int  # entries per row (a block or a chunk)

    @abc.abstractmethod
    def regions(self) -> list[tuple[torch.dtype, int]]:
        """The message's regions: (dtype, entries per row), in order."""

    @abc.abstractmethod
    def _encode(self, rows: torch.Tensor, out: list[torch.Tensor]) -> None:
        """Encode ``rows`` (r x row, float32) into the regions ``out`` (r x entries each)."""

    @abc.abstractmethod
    def _decode(self, parts: list[torch.Tensor], rows: torch.Tensor) -> None:
        """Write the values that ``parts`` encode into ``rows``."""

    def rows(self, n: int) -> int:
        return -(-n // self.row)

    def _layout(self, n: int) -> tuple[list[tuple[torch.dtype, int, int]], int]:
        """``([(dtype, byte offset, bytes) of each region], the message's size)`` for ``n`` entries."""
        r, offset, layout = self.rows(n), 0, []
        for dtype, per_row in self.regions():
            offset = _align(offset)
            layout.append((dtype, offset, r * per_row * dtype.itemsize))
            offset += layout[-1][2]
        return layout, _align(offset)

    def nbytes(self, n: int) -> int:
        """The size of the message for ``n`` entries."""
        return self._layout(n)[1]

    def _parts(self, buf: torch.Tensor, n: int) -> list[torch.Tensor]:
        r = self.rows(n)
        return [buf[offset:offset + size].view(dtype).view(r, -1) for dtype, offset, size in self._layout(n)[0]]

    def encode(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Write ``x`` (float32, 1-D) into the uint8 buffer ``out`` of :meth:`nbytes` bytes."""
        n, full = x.numel(), x.numel() // self.row
        parts = self._parts(out, n)
        if full:
            self._encode(x[:full * self.row].view(full, self.row), [p[:full] for p in parts])
        if full * self.row < n:  # the last, partial row: zero-padded
            tail = torch.zeros(1, self.row, dtype=x.dtype, device=x.device)
            tail[0, :n - full * self.row] = x[full * self.row:]
            self._encode(tail, [p[full:] for p in parts])

    def decode(self, buf: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write the vector that ``buf`` encodes into ``out`` (float32, 1-D); returns ``out``."""
        n, full = out.numel(), out.numel() // self.row
        parts = self._parts(buf, n)
        if full:
            self._decode([p[:full] for p in parts], out[:full * self.row].view(full, self.row))
        if full * self.row < n:
            tail = torch.empty(1, self.row, dtype=out.dtype, device=out.device)
            self._decode([p[full:] for p in parts], tail)
            out[full * self.row:] = tail[0, :n - full * self.row]
        return out


class Int8(Codec):
    """Symmetric 8-bit integers with a bfloat16 scale per block (module docstring). Codes
    are stored shifted by :attr:`levels` (0 .. 2 levels) so that a float-to-uint8 copy
    rounds them."""

    name, levels = "int8", 127

    def __init__(self, block: int = 256) -> None:
        self.row = block
        self._scratch: dict[tuple, torch.Tensor] = {}  # a fresh 40 MB tensor costs more than the arithmetic

    def regions(self) -> list[tuple[torch.dtype, int]]:
        return [(torch.bfloat16, 1), (torch.uint8, self.row)]

    def _scratch_for(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = (rows.shape, rows.device, dtype)
        if key not in self._scratch:
            self._scratch[key] = torch.empty(rows.shape, dtype=dtype, device=rows.device)
        return self._scratch[key]

    def _codes(self, rows: torch.Tensor, scale_out: torch.Tensor) -> torch.Tensor:
        """``rows / scale`` shifted to ``0.5 .. 2 levels + 0.5``: a uint8 copy floors it
        (the bfloat16 scale rounded first: encoder and decoder use the same)."""
        tmp = self._scratch_for(rows)
        top = torch.amax(torch.abs(rows, out=tmp), dim=1, keepdim=True)
        scale_out.copy_(top / self.levels)
        scale = scale_out.float()
        inverse = torch.where(scale > 0, scale.reciprocal(), torch.zeros_like(scale))
        return torch.mul(rows, inverse, out=tmp).add_(self.levels + 0.5).clamp_(0.5, 2 * self.levels + 0.5)

    def _encode(self, rows: torch.Tensor, out: list[torch.Tensor]) -> None:
        out[1].copy_(self._codes(rows, out[0]))

    def _decode(self, parts: list[torch.Tensor], rows: torch.Tensor) -> None:
        rows.copy_(parts[1]).sub_(self.levels).mul_(parts[0].float())


class Int4(Int8):
    """Symmetric 4-bit integers (-7..7, stored 0..14), two to a byte, with a bfloat16
    scale per block."""

    name, levels = "int4", 7

    def regions(self) -> list[tuple[torch.dtype, int]]:
        return [(torch.bfloat16, 1), (torch.uint8, self.row // 2)]

    def _encode(self, rows: torch.Tensor, out: list[torch.Tensor]) -> None:
        q = self._scratch_for(rows, torch.uint8).copy_(self._codes(rows, out[0]))
        torch.bitwise_or(q[:, 0::2], q[:, 1::2].bitwise_left_shift(4), out=out[1])

    def _decode(self, parts: list[torch.Tensor], rows: torch.Tensor) -> None:
        packed = parts[1]
        pairs = rows.view(rows.shape[0], -1, 2)
        pairs[:, :, 0] = packed.bitwise_and(15)
        pairs[:, :, 1] = packed.bitwise_right_shift(4)
        rows.sub_(self.levels).mul_(parts[0].float())


class TopK(Codec):
    """The largest ``fraction`` of each chunk's entries, at 2 bits each (module docstring)."""

    name = "topk"

    def __init__(self, fraction: float = TOPK_FRACTION, chunk: int = 4096) -> None:
        if not 0.0 < fraction <= 0.5:
            raise ValueError(f"the top-k fraction must be in (0, 0.5]; got {fraction!r}")
        if not 4 <= chunk <= 32768:
            raise ValueError(f"the top-k chunk must hold 4 to 32768 entries (int16 indices); got {chunk!r}")
        self.fraction, self.row = float(fraction), chunk
        self.k = min(chunk, 4 * math.ceil(math.ceil(fraction * chunk) / 4))  # whole bytes of 2-bit codes

    def regions(self) -> list[tuple[torch.dtype, int]]:
        return [(torch.bfloat16, 2), (torch.int16, self.k), (torch.uint8, self.k // 4)]

    def _encode(self, rows: torch.Tensor, out: list[torch.Tensor]) -> None:
        scales, indices, codes = out
        values, index = torch.topk(rows.abs(), self.k, dim=1, sorted=False)
        lo, hi = torch.aminmax(values, dim=1, keepdim=True)
        high = values >= (lo + hi) / 2  # which half of the kept range
        # each half sent as its mean magnitude (the best one value for it); an empty half as its edge
        count = high.sum(1, keepdim=True)
        top = torch.where(high, values, 0.0).sum(1, keepdim=True)
        scales[:, 1:] = torch.where(count > 0, top / count.clamp(min=1), hi)
        scales[:, :1] = torch.where(count < self.k, (values.sum(1, keepdim=True) - top) / (self.k - count).clamp(min=1),
                                    lo)
        indices.copy_(index)
        negative = torch.gather(rows, 1, index) < 0
        code = (negative.to(torch.uint8) << 1 | high.to(torch.uint8)).view(-1, self.k // 4, 4)
        torch.bitwise_or(code[:, :, 0] | code[:, :, 1] << 2, code[:, :, 2] << 4 | code[:, :, 3] << 6, out=codes)

    def _decode(self, parts: list[torch.Tensor], rows: torch.Tensor) -> None:
        scales, indices, codes = parts
        code = torch.stack([codes >> s & 3 for s in (0, 2, 4, 6)], dim=2).view(-1, self.k)
        magnitude = torch.where(code & 1 == 1, scales[:, 1:].float(), scales[:, :1].float())
        value = torch.where(code >> 1 == 1, -magnitude, magnitude)
        rows.zero_().scatter_(1, indices.long(), value)


def codec(name: str, topk_fraction: float = TOPK_FRACTION) -> Codec | None:
    """The codec called ``name`` (``int8``, ``int4``, ``topk``), or None for a floating
    type (``float32``, ``float16``, ``bfloat16``: :mod:`mpi_easgd.transfer` casts those)."""
    if name == "int8":
        return Int8()
    if name == "int4":
        return Int4()
    if name == "topk":
        return TopK(topk_fraction)
    return None


def wire_format(name: str, topk_fraction: float = TOPK_FRACTION) -> torch.dtype | Codec:
    """What ``--exchange-dtype name`` sends: a floating torch dtype, or a :class:`Codec`."""
    return codec(name, topk_fraction) or exchange_dtype(name)


def message_buffer(codec: Codec, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A uint8 buffer for one message of ``n`` entries."""
    return torch.zeros(codec.nbytes(n), dtype=torch.uint8, device=device)


class DeltaSender:
    """Sends increments with error feedback: what a message left out is added to the next
    (``feedback=False``: dropped, which only a test should want). :attr:`residual` is the
    sender's state (it belongs in a checkpoint)."""

    def __init__(self, codec: Codec, n: int, device: torch.device | str = "cpu", feedback: bool = True) -> None:
        self.codec, self.feedback = codec, feedback
        self.residual = torch.zeros(n, dtype=torch.float32, device=device)
        self.sent = torch.zeros(n, dtype=torch.float32, device=device)  # what the receiver decodes

    def encode(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Encode ``x`` plus the residual into ``out``; returns what the receiver will decode."""
        message = torch.add(x, self.residual, out=self.residual) if self.feedback else x
        self.codec.encode(message, out)
        self.codec.decode(out, self.sent)
        if self.feedback:
            self.residual.sub_(self.sent)
        return self.sent


class StateSender:
    """Sends a state against a reference both ends hold (module docstring). ``reference``:
    the state both ends start from (copied). ``scratch``: a float32 vector of its size to
    work in, which ends used one at a time may share (default: its own)."""

    def __init__(self, codec: Codec, reference: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
        self.codec = codec
        self.reference = reference.detach().to(torch.float32, copy=True)
        self._step = torch.empty_like(self.reference) if scratch is None else scratch

    def reset(self, reference: torch.Tensor) -> None:
        """Both ends start again from ``reference`` (a new connection, a resumed run)."""
        self.reference.copy_(reference)

    def encode(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Encode ``x - reference`` into ``out``; returns the new reference (what the
        receiver will hold)."""
        self.codec.encode(torch.sub(x, self.reference, out=self._step), out)
        return self.reference.add_(self.codec.decode(out, self._step))


class StateReceiver(StateSender):
    """The receiving end of a :class:`StateSender`: the same reference, moved by what arrives."""

    def decode(self, buf: torch.Tensor) -> torch.Tensor:
        """The state ``buf`` brings (the reference, moved by it; not to be written)."""
        return self.reference.add_(self.codec.decode(buf, self._step))
