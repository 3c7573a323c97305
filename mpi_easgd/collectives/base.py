"""Pieces shared by the synchronous algorithms: flattening once, broadcasting, and the
base classes (the guard that turns a mismatch of collectives across ranks into a message
instead of a silent hang is :class:`mpi_easgd.runtime.watchdog.CollectiveGuard`)."""

from __future__ import annotations

import abc
import contextlib
import functools
import time
import weakref

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpi_easgd.collectives.rounds import RoundBuffer
from mpi_easgd.compress import Codec, wire_format
from mpi_easgd.flat import FlatParameters
from mpi_easgd.runtime import faults
from mpi_easgd.runtime.watchdog import CollectiveGuard
from mpi_easgd.transfer import MPIBuffer


class FlatCache:
    """The :class:`FlatParameters` of the model an algorithm works on, built on first use.

    An algorithm object serves one model; a second model is refused rather than silently
    mixing buffers.
    """

    def __init__(self, *, grad_extra: int = 0, transfer: str = "auto") -> None:
        self._grad_extra = grad_extra
        self.transfer = transfer
        self._model: weakref.ref | None = None
        self.flat: FlatParameters | None = None

    def get(self, model: nn.Module) -> FlatParameters:
        if self.flat is not None and self._model is not None and self._model() is model:
            return self.flat
        if self.flat is not None:
            raise ValueError("this algorithm object already serves another model; make one per model")
        self.flat = FlatParameters(model, grad_extra=self._grad_extra)
        self._model = weakref.ref(model)
        self.data = MPIBuffer(self.flat.data, self.transfer)
        self.grad = MPIBuffer(self.flat.grad_buffer, self.transfer)
        return self.flat


def bcast_tensor(comm: MPI.Comm, tensor: torch.Tensor, root: int, transfer: str = "auto") -> None:
    """Broadcast one contiguous tensor from ``root`` in place (any dtype, any device)."""
    buf = MPIBuffer(tensor, transfer)
    buf.before_send()
    comm.Bcast(buf.mpi, root=root)
    buf.after_recv()


def bcast_module_state(comm: MPI.Comm, model: nn.Module, data: MPIBuffer, root: int) -> None:
    """Broadcast the whole state of ``model`` from ``root``: the flat (trainable)
    parameters in one call, then every frozen parameter (``requires_grad=False``, outside
    the flat buffer) and every buffer (e.g. BatchNorm statistics), with the same transfer
    mode as the flat buffer."""
    data.before_send()
    comm.Bcast(data.mpi, root=root)
    data.after_recv()
    frozen = [p.data for p in model.parameters() if not p.requires_grad]
    for t in (*frozen, *model.buffers()):
        if t.numel():
            if not t.is_contiguous():
                raise ValueError("a frozen parameter or buffer of the model is not contiguous; "
                                 "call .contiguous() on it before training")
            bcast_tensor(comm, t, root, data.mode)


class Collective(abc.ABC):
    """What every synchronous class shares: a guard on its collectives (:class:`CollectiveGuard`)
    and the flat buffers of the one model it serves. Use it as a context manager, or call
    :meth:`close` when done: that ends the guard's watchdog thread (it also ends once the
    object is garbage-collected)."""

    _guard: CollectiveGuard
    _cache: FlatCache

    def flat(self, model: nn.Module) -> FlatParameters:
        """The flat parameter/gradient buffers of ``model`` (built on first use)."""
        return self._cache.get(model)

    @property
    def exchange_seconds(self) -> float:
        """Seconds this rank has spent in this object's calls that communicate."""
        return self._guard.seconds

    all_rounds = 0  # collective rounds this rank took part in (with those that moved nothing)

    @abc.abstractmethod
    def round_bytes(self) -> tuple[int, int]:
        """(bytes this rank hands MPI to send, bytes MPI hands back) in one round: buffer
        sizes; what a reduction moves on the wire is MPI's choice (a ring: ``2 (p - 1) /
        p`` of the buffer each way)."""

    @property
    def bytes_per_round(self) -> int:
        """Bytes this rank hands MPI in one round."""
        return self.round_bytes()[0]

    def traffic(self) -> tuple[int, int]:
        """:meth:`round_bytes` over every round so far."""
        sent, received = self.round_bytes()
        return sent * self.all_rounds, received * self.all_rounds

    def _link(self) -> faults.Link | None:
        """This rank's emulated network link, if ``$MPI_EASGD_FAULT`` sets one (read once)."""
        if not hasattr(self, "_emulated"):
            self._emulated = faults.emulated_link(MPI.COMM_WORLD.Get_rank())
        return self._emulated

    def close(self) -> None:
        """Stop watching this object's calls (idempotent)."""
        self._guard.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PeriodicRounds(Collective):
    """The algorithms that keep a center and run a collective round every ``tau`` local
    steps (AllReduceEA, AllReduceDiLoCo), as the seed's calls: :meth:`average_parameters`
    after every optimizer step, :meth:`synchronize_center` when a rank's epoch ends.

    A round is started (:meth:`_launch`) and finished (:meth:`_land`) apart: with
    ``fragments`` P > 1, a round starts every ``tau / P`` steps (at the offsets ``p tau //
    P`` of each period), and with ``overlap_steps`` d it lands ``d`` steps after it started,
    the rank stepping meanwhile; at most one is in flight. EA, and DiLoCo by default, have
    P = 1 and d = 0: a whole round every ``tau`` steps.

    The contract for a subclass: its constructor sets ``comm``, ``tau``, ``center = None``
    (a flat tensor once :meth:`synchronize_parameters` has run), ``rounds = 0``, ``_cache``
    (:class:`FlatCache`) and ``_guard`` (:class:`CollectiveGuard`), and it implements the
    abstract methods below plus ``state_dict`` / ``load_state_dict``. The counting,
    the schedule, the guard and the seed's uneven-endings loop are here, once."""

    calls = 0  # local steps since the last synchronize_parameters / synchronize_center
    steps = 0  # local steps since synchronize_parameters
    fragments = 1
    overlap_steps = 0
    center: torch.Tensor | None
    tau: int
    rounds: int
    _due: int | None = None  # the call at which the round in flight lands (None: none in flight)
    _flight: RoundBuffer | None = None
    _started = 0.0

    def _exchange_format(self, exchange_dtype: str, topk_fraction: float, error_feedback: bool) -> None:
        """Check and keep the format of the rounds: a floating type (:attr:`wire`) or a
        codec (:attr:`codec`, with error feedback unless ``error_feedback`` is False)."""
        wire = wire_format(exchange_dtype, topk_fraction)
        self.codec, self.error_feedback = (wire if isinstance(wire, Codec) else None), error_feedback
        self.wire = torch.float32 if self.codec else wire

    def _round_buffer(self, n: int, device: torch.device) -> RoundBuffer:
        """A round of ``n`` entries in this object's format."""
        return RoundBuffer(self.comm, n, device, transfer=self._cache.transfer, wire=self.wire, codec=self.codec,
                           feedback=self.error_feedback, chunk_bytes=self.chunk_bytes)

    def round_bytes(self) -> tuple[int, int]:
        return self._rounds_of()[0].round_bytes()

    @abc.abstractmethod
    def _rounds_of(self) -> list[RoundBuffer]:
        """The round buffers (one per fragment)."""

    @abc.abstractmethod
    def synchronize_parameters(self, model: nn.Module) -> None:
        """Every rank takes rank 0's parameters (and buffers); the center starts there."""

    @abc.abstractmethod
    def _launch(self, flat: FlatParameters, stepping: bool) -> RoundBuffer:
        """Start the next round with this rank's state; ``stepping``: whether this rank
        still takes local steps. Returns the round's buffer."""

    @abc.abstractmethod
    def _land(self, flat: FlatParameters) -> int:
        """Finish the round in flight and apply it. Returns 1 if some rank was still
        stepping when it started, else 0 (every rank gets the same answer)."""

    @abc.abstractmethod
    def _agree(self, flat: FlatParameters) -> None:
        """Make every rank's copy of the center (and the algorithm's state) bitwise equal
        to rank 0's, after the epoch's rounds."""

    def _start(self, flat: FlatParameters, stepping: bool) -> None:
        self._started = time.perf_counter()
        self._flight = self._launch(flat, stepping)
        self._due = self.calls + self.overlap_steps

    def _finish(self, flat: FlatParameters) -> int:
        link = self._link()
        if link is not None:  # an emulated slow network (MPI_EASGD_FAULT action=delay)
            link.wait(self._started, self._flight.wire_bytes())
        still = self._land(flat)
        self._due, self._flight = None, None
        self.all_rounds += 1
        return still

    def abandon(self, keep_residuals: bool = True) -> None:
        """After a rank died (``--on-rank-loss shrink``): forget the round in flight (its
        communicator is broken; what it carried is lost) and, unless ``keep_residuals``,
        what this rank's compressed messages still owed (a survivor that takes another
        rank's state must not send that rank's residual a second time)."""
        self._due = self._flight = None
        if not keep_residuals:
            for round_ in self._rounds_of():
                round_.load_state_dict({"residual": torch.zeros(round_.n)})

    def _settle(self) -> None:
        """Land the round in flight, if any (before a checkpoint: every rank at the same step)."""
        if self._due is not None:
            with self._guard("state_dict"):
                self._finish(self._cache.flat)

    def average_parameters(self, model: nn.Module) -> bool:
        """Count one local step (after the optimizer step): land the round in flight when
        it is due, start one when the schedule says (the class docstring). Returns True
        when a round started."""
        if self.center is None:
            raise RuntimeError("call synchronize_parameters(model) before average_parameters")
        self.calls += 1
        self.steps += 1
        due = self._due is not None and self.calls >= self._due
        starts = self.calls % self.tau in self._offsets
        if not (due or starts):
            if self._flight is not None:
                self._flight.progress()
            return False
        with self._guard("average_parameters"):
            flat = self._cache.get(model)
            if self._due is not None:  # due, or one must land before the next starts
                self._finish(flat)
            if starts:
                self._start(flat, stepping=True)
                if not self.overlap_steps:
                    self._finish(flat)
        return starts

    @functools.cached_property
    def _offsets(self) -> frozenset[int]:
        """The steps of each period at which a round starts (``tau`` and ``fragments`` are fixed)."""
        return frozenset(p * self.tau // self.fragments for p in range(self.fragments))

    def synchronize_center(self, model: nn.Module) -> None:
        """Finish the epoch: land the round in flight, then take part in rounds (with this
        rank's real state) until ``fragments`` rounds in a row in which no rank is still
        stepping (each fragment has had one); then make every rank's copy of the center
        bitwise equal to rank 0's (floating-point drift) and reset the step counter."""
        if self.center is None:
            raise RuntimeError("call synchronize_parameters(model) before synchronize_center")
        with self._guard("synchronize_center"):
            flat = self._cache.get(model)
            if self._due is not None:
                self._finish(flat)
            quiet = 0
            while quiet < self.fragments:
                self._start(flat, stepping=False)
                quiet = 0 if self._finish(flat) else quiet + 1
            self._agree(flat)
        self.calls = 0

    @contextlib.contextmanager
    def center_in(self, model: nn.Module):
        """``with algo.center_in(model):`` the model holds the center inside the block (to
        evaluate or save it), its own parameters again after it."""
        if self.center is None:
            raise RuntimeError("call synchronize_parameters(model) before center_in")
        flat = self._cache.get(model)
        own = flat.data.clone()
        flat.data.copy_(self.center)
        try:
            yield model
        finally:
            flat.data.copy_(own)


def argmax_rank(comm: MPI.Comm, value: int) -> int:
    """The rank with the largest ``value``; ties go to the lowest rank."""
    values = np.asarray(comm.allgather(int(value)))
    return int(np.argmax(values))
