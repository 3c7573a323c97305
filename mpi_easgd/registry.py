"""The algorithms, each described once: which family it belongs to, what it is made of,
which settings it uses, and what its summary records.

Everything that differs between algorithms is read from here (``lookup(name)``): the
command line's choices and checks, the defaults that depend on the algorithm, the
topology (a parameter server or not), the summary's fields, and the objects that do the
work, named by import path (``"package.module:Name"``) so that this module stays at the
bottom of the package (no torch, no MPI) and a plug-in can name its own.

- A synchronous algorithm names its class in :mod:`mpi_easgd.collectives`; the command
  line builds it with ``cls.from_config(comm, cfg, **guard)``.
- An asynchronous one names its server-side and worker-side rules in
  :mod:`mpi_easgd.rules.asynchronous`; the engine (:mod:`mpi_easgd.ps`) builds them with
  ``from_config``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

SYNC, ASYNC = "sync", "async"


@dataclass(frozen=True)
class Algorithm:
    """One algorithm. ``uses``: the configuration fields it reads beyond those every run
    reads (epochs, batch size, the local optimizer...); a flag it does not use is refused
    where giving it would mislead (see :mod:`mpi_easgd.config`)."""

    name: str
    family: str  # SYNC: every rank a peer; ASYNC: a server, a tester and workers
    summary: str  # one line for --help and the README
    uses: frozenset[str]
    recorded: tuple[str, ...]  # the settings its summary records ("beta": workers * alpha)
    implementation: str = ""  # SYNC: "module:Class" of the collective
    server_rule: str = ""  # ASYNC: "module:Class" of the rule the server applies
    worker_rule: str = ""  # ASYNC: "module:Class" of the worker's side
    nesterov: bool = False  # the local optimizer uses Nesterov momentum (EAMSGD)
    default_lr: float = 0.1  # with --optimizer sgd (adamw: 0.001 for every algorithm)
    default_momentum: float = 0.0

    @property
    def is_async(self) -> bool:
        return self.family == ASYNC

    @property
    def elastic(self) -> bool:
        """Whether ``alpha`` pulls workers and center together (``beta = p * alpha``)."""
        return "alpha" in self.uses

    @property
    def outer(self) -> bool:
        """Whether an outer optimizer steps the center (DiLoCo)."""
        return "outer_lr" in self.uses

    def load(self, what: str = "implementation"):
        """The class that ``what`` (implementation, server_rule, worker_rule) names."""
        return load_object(getattr(self, what))

    def settings(self, cfg, workers: int) -> dict:
        """The algorithm's own settings, as the run summary records them."""
        return {name: cfg.alpha * workers if name == "beta" else getattr(cfg, name) for name in self.recorded}


def load_object(path: str):
    """The object named ``"package.module:Name"``."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


_SYNC_USES = frozenset({"on_rank_loss"})
_ASYNC_USES = frozenset({"tau", "exchange_dtype", "overlap_exchange", "on_worker_loss", "test_every", "audit"})
_RULES = "mpi_easgd.rules.asynchronous"
_ELASTIC = ("tau", "alpha", "beta", "exchange_dtype")
_OUTER = ("tau", "outer_lr", "outer_momentum")

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("sgd", SYNC, "synchronous data-parallel SGD (AllReduceSGD: one gradient Allreduce per step)",
              uses=_SYNC_USES, recorded=(), implementation="mpi_easgd.collectives.allreduce_sgd:AllReduceSGD"),
    Algorithm("ea", SYNC, "synchronous elastic averaging (AllReduceEA)",
              uses=_SYNC_USES | {"tau", "alpha", "exchange_dtype"}, recorded=_ELASTIC,
              implementation="mpi_easgd.collectives.allreduce_ea:AllReduceEA"),
    Algorithm("diloco", SYNC, "DiLoCo: an outer Nesterov step on the averaged pseudo-gradient every tau steps",
              uses=_SYNC_USES | {"tau", "outer_lr", "outer_momentum", "exchange_dtype"},
              recorded=(*_OUTER, "exchange_dtype"),
              implementation="mpi_easgd.collectives.allreduce_diloco:AllReduceDiLoCo"),
    Algorithm("easgd", ASYNC, "asynchronous elastic averaging SGD around a parameter server",
              uses=_ASYNC_USES | {"alpha"}, recorded=(*_ELASTIC, "overlap_exchange"),
              server_rule=f"{_RULES}:ElasticServer", worker_rule=f"{_RULES}:ElasticWorker"),
    Algorithm("eamsgd", ASYNC, "EASGD with Nesterov momentum in the workers' local steps",
              uses=_ASYNC_USES | {"alpha"}, recorded=(*_ELASTIC, "overlap_exchange"),
              server_rule=f"{_RULES}:ElasticServer", worker_rule=f"{_RULES}:ElasticWorker",
              nesterov=True, default_lr=0.01, default_momentum=0.9),
    # (DOWNPOUR has no elastic coefficient; its summary has recorded alpha and beta all along)
    Algorithm("downpour", ASYNC, "DOWNPOUR: workers push accumulated updates, the server sums them",
              uses=_ASYNC_USES, recorded=(*_ELASTIC, "overlap_exchange"),
              server_rule=f"{_RULES}:DownpourServer", worker_rule=f"{_RULES}:DownpourWorker"),
    Algorithm("async-diloco", ASYNC, "asynchronous DiLoCo: pseudo-gradients through a delayed Nesterov outer step",
              uses=_ASYNC_USES | {"outer_lr", "outer_momentum", "outer_delay"},
              recorded=(*_OUTER, "outer_delay", "exchange_dtype", "overlap_exchange"),
              server_rule=f"{_RULES}:OuterServer", worker_rule=f"{_RULES}:OuterWorker"),
)}

NAMES = tuple(ALGORITHMS)
SYNC_NAMES = tuple(n for n, a in ALGORITHMS.items() if not a.is_async)
ASYNC_NAMES = tuple(n for n, a in ALGORITHMS.items() if a.is_async)


def lookup(name: str) -> Algorithm:
    """The algorithm called ``name``; a ``KeyError`` whose message lists the known ones."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise KeyError(f"unknown algorithm '{name}'; choose one of {', '.join(NAMES)}") from None


def using(field: str) -> tuple[str, ...]:
    """The algorithms that use configuration ``field``."""
    return tuple(n for n, a in ALGORITHMS.items() if field in a.uses)
