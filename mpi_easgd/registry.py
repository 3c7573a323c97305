"""The algorithms, each described once: which family it belongs to, what it is made of,
which settings it uses, and what its summary records.

Everything that differs between algorithms is read from here (``lookup(name)``): the
command line's choices and checks, the defaults that depend on the algorithm, the
topology (a parameter server or not), the summary's fields, and the objects that do the
work, named by import path (``"package.module:Name"``) so that this module stays at the
bottom of the package (no torch, no MPI) and a plug-in can name its own.

- A synchronous algorithm names its class in :mod:`mpi_easgd.collectives`; the command
  line builds it with ``cls.from_config(comm, cfg, **guard)``.
- An asynchronous one names its rule: a :class:`~mpi_easgd.rules.asynchronous.ServerRule`
  subclass, whose ``worker_rule`` is its worker side; the engine (:mod:`mpi_easgd.ps`)
  builds both.

A user's own asynchronous rule is looked up by its import path, ``package.module:Rule``
(``--algo package.module:Rule``): :func:`lookup` imports it and describes it from the
class itself (its ``settings``, ``nesterov``, first docstring line).
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
    implementation: str = ""  # "module:Class": SYNC the collective, ASYNC the server's rule (a ServerRule)
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

    def load(self):
        """The class that does the work (SYNC: the collective; ASYNC: the server's rule,
        whose ``worker_rule`` is the worker's side)."""
        return load_object(self.implementation)

    def settings(self, cfg, workers: int) -> dict:
        """The algorithm's own settings, as the run summary records them."""
        settings = {name: cfg.alpha * workers if name == "beta" else getattr(cfg, name) for name in self.recorded}
        if settings.get("exchange_dtype") == "topk":
            settings["topk_fraction"] = cfg.topk_fraction
        if "max_staleness" in self.uses and cfg.max_staleness:
            settings["max_staleness"] = cfg.max_staleness
        if "outer_quorum" in self.uses and cfg.outer_quorum:
            settings["outer_quorum"] = cfg.outer_quorum
        if "servers" in self.uses and cfg.servers > 1:
            settings["servers"] = cfg.servers
        if "groups" in self.uses and cfg.groups != "1":
            settings.update(groups=cfg.groups, group_tau=cfg.group_tau or cfg.tau)
        return settings


class AlgorithmError(ValueError):
    """An algorithm's name is unknown, or a user's rule cannot be used (one line saying why)."""


def load_object(path: str):
    """The object named ``"package.module:Name"`` (a dotted name after the colon too)."""
    module, _, name = path.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def load_user_object(path: str, flag: str, error: type[Exception]):
    """A user's object named on the command line (``flag path``, ``package.module:name``),
    or ``error`` with one line saying why it cannot be had (no traceback)."""
    module, _, name = path.partition(":")
    try:
        return load_object(path)
    except ModuleNotFoundError as exc:
        raise error(f"{flag} {path}: cannot import {module} ({exc}); put it on PYTHONPATH or in the "
                    f"directory you launch from") from None
    except AttributeError:
        raise error(f"{flag} {path}: {module} has no {name}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing: one line
        raise error(f"{flag} {path}: importing {module} failed ({type(exc).__name__}: {exc})") from None


_SYNC_USES = frozenset({"on_rank_loss", "keep_global_batch"})
_ASYNC_USES = frozenset({"tau", "exchange_dtype", "topk_fraction", "overlap_exchange", "on_worker_loss", "test_every",
                         "audit", "max_staleness", "servers", "groups", "group_tau"})
_RULES = "mpi_easgd.rules.asynchronous"
_ELASTIC = ("tau", "alpha", "beta", "exchange_dtype")
_OUTER = ("tau", "outer_lr", "outer_momentum")
_STREAMING = ("fragments", "overlap_steps", "mixing")

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("sgd", SYNC, "synchronous data-parallel SGD (AllReduceSGD: one gradient Allreduce per step)",
              uses=_SYNC_USES, recorded=(), implementation="mpi_easgd.collectives.allreduce_sgd:AllReduceSGD"),
    Algorithm("ea", SYNC, "synchronous elastic averaging (AllReduceEA)",
              uses=_SYNC_USES | {"tau", "alpha", "exchange_dtype", "topk_fraction"}, recorded=_ELASTIC,
              implementation="mpi_easgd.collectives.allreduce_ea:AllReduceEA"),
    Algorithm("diloco", SYNC, "DiLoCo: an outer Nesterov step on the averaged pseudo-gradient every tau steps",
              uses=_SYNC_USES | {"tau", "outer_lr", "outer_momentum", "exchange_dtype", "topk_fraction", *_STREAMING},
              recorded=(*_OUTER, "exchange_dtype", *_STREAMING),
              implementation="mpi_easgd.collectives.allreduce_diloco:AllReduceDiLoCo"),
    Algorithm("easgd", ASYNC, "asynchronous elastic averaging SGD around a parameter server",
              uses=_ASYNC_USES | {"alpha"}, recorded=(*_ELASTIC, "overlap_exchange"),
              implementation=f"{_RULES}:ElasticServer"),
    Algorithm("eamsgd", ASYNC, "EASGD with Nesterov momentum in the workers' local steps",
              uses=_ASYNC_USES | {"alpha"}, recorded=(*_ELASTIC, "overlap_exchange"),
              implementation=f"{_RULES}:ElasticServer", nesterov=True, default_lr=0.01, default_momentum=0.9),
    # (DOWNPOUR has no elastic coefficient; its summary has recorded alpha and beta all along)
    Algorithm("downpour", ASYNC, "DOWNPOUR: workers push accumulated updates, the server sums them",
              uses=_ASYNC_USES, recorded=(*_ELASTIC, "overlap_exchange"),
              implementation=f"{_RULES}:DownpourServer"),
    Algorithm("async-diloco", ASYNC, "asynchronous DiLoCo: pseudo-gradients through a delayed Nesterov outer step",
              uses=_ASYNC_USES | {"outer_lr", "outer_momentum", "outer_delay", "outer_quorum"},
              recorded=(*_OUTER, "outer_delay", "exchange_dtype", "overlap_exchange"),
              implementation=f"{_RULES}:OuterServer"),
)}

NAMES = tuple(ALGORITHMS)
SYNC_NAMES = tuple(n for n, a in ALGORITHMS.items() if not a.is_async)
ASYNC_NAMES = tuple(n for n, a in ALGORITHMS.items() if a.is_async)


_PLUGINS: dict[str, Algorithm] = {}  # user rules, described on first lookup


def lookup(name) -> Algorithm:
    """The algorithm called ``name``: a built-in one, a user's rule by its import path
    (``"package.module:Rule"``), or a rule class itself. Raises :class:`AlgorithmError`
    with one line when there is none."""
    if isinstance(name, type):
        name = f"{name.__module__}:{name.__qualname__}"
    if name in ALGORITHMS:
        return ALGORITHMS[name]
    if ":" not in str(name):
        raise AlgorithmError(f"unknown algorithm '{name}'; choose one of {', '.join(NAMES)}, or name your own "
                             f"asynchronous rule as package.module:Rule")
    if name not in _PLUGINS:
        _PLUGINS[name] = describe_rule(name)
    return _PLUGINS[name]


def describe_rule(path: str) -> Algorithm:
    """A user's asynchronous rule (a ``ServerRule`` subclass named ``package.module:Rule``)
    as an algorithm of the registry."""
    rule = load_user_object(path, "--algo", AlgorithmError)
    # (checked by what they have: this module sits below the rules and imports none of them)
    if not (isinstance(rule, type) and callable(getattr(rule, "apply", None)) and hasattr(rule, "params")):
        raise AlgorithmError(f"--algo {path} is not a rule: name a subclass of mpi_easgd.rules.asynchronous.ServerRule")
    worker = getattr(rule, "worker_rule", None)
    if not (isinstance(worker, type) and all(hasattr(worker, m) for m in ("build", "prepare", "absorb"))):
        raise AlgorithmError(f"--algo {path} has no worker side: set its worker_rule to a WorkerRule subclass "
                             f"(for example mpi_easgd.rules.asynchronous.ElasticWorker)")
    unknown = set(rule.settings) - _RULE_SETTINGS
    if unknown:
        raise AlgorithmError(f"--algo {path}: unknown settings {sorted(unknown)}; a rule reads any of "
                             f"{', '.join(sorted(_RULE_SETTINGS))}")
    recorded = ("tau", *(("alpha", "beta") if "alpha" in rule.settings else ()),
                *(s for s in rule.settings if s != "alpha"), "exchange_dtype", "overlap_exchange")
    doc = (rule.__doc__ or path).strip().splitlines()[0]
    return Algorithm(path, ASYNC, doc, uses=_ASYNC_USES | set(rule.settings), recorded=recorded,
                     implementation=path, nesterov=bool(rule.nesterov), default_momentum=0.9 if rule.nesterov else 0.0)


_RULE_SETTINGS = frozenset({"alpha", "outer_lr", "outer_momentum", "outer_delay", "outer_quorum"})


def using(field: str) -> tuple[str, ...]:
    """The algorithms that use configuration ``field``."""
    return tuple(n for n, a in ALGORITHMS.items() if field in a.uses)
