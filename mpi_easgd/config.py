"""Run configuration: one typed dataclass, loadable from TOML, overridden from the command line.

Precedence: defaults < ``--config FILE.toml`` < command-line flags. Every check here is
local (no MPI), so every rank rejects a bad configuration before any traffic.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from mpi_easgd import registry

DEVICES = ("cpu", "cuda", "auto")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range (message names the fix)."""


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    """Everything a run needs. Batch size is per rank; the learning rate is never rescaled."""

    algo: str = _opt("easgd", "algorithm: " + ", ".join(registry.NAMES) + ", or your own asynchronous rule as "
                              "package.module:Rule (a ServerRule subclass)")
    dataset: str = _opt("mnist5k", "built-in dataset name (mnist5k, pystdlib), path to an HDF5 file, or your own "
                                   "torch datasets as package.module:factory (factory() returns train, test)")
    task: str = _opt("classification", "what the model learns: classification (cross-entropy, accuracy), next-token "
                                       "(a language model: loss per token, perplexity) or regression (mean squared "
                                       "error)", choices=("classification", "next-token", "regression"))
    model: str = _opt("lenet", "model name (mlp, lenet, cifarnet, resnet20, convmlp, or torchvision:NAME), or your "
                               "own as package.module:factory, called as factory(shape, num_classes)")
    epochs: int = _opt(20, "passes over each rank's (worker's) shard")
    batch_size: int = _opt(32, "mini-batch size per rank")
    lr: float | None = _opt(None, "learning rate (of the inner optimizer for diloco), never scaled by the "
                            "number of ranks (default: 0.1; 0.01 for eamsgd, whose momentum multiplies the "
                            "step; 0.001 with --optimizer adamw)")
    momentum: float | None = _opt(None, "momentum (default: 0.9 for eamsgd, else 0)")
    weight_decay: float = _opt(0.0, "L2 weight decay (decoupled, for adamw)")
    optimizer: str = _opt("sgd", "the local optimizer of every rank: sgd (with --momentum; Nesterov for eamsgd) "
                                 "or adamw", choices=("sgd", "adamw"))
    tau: int = _opt(10, "local steps between elastic/parameter-server exchanges")
    alpha: float | None = _opt(None, "elastic coefficient per worker (default: 0.9 / workers, at most 0.5)")
    outer_lr: float = _opt(0.7, "diloco, async-diloco: learning rate of the outer Nesterov step on the center")
    outer_momentum: float = _opt(0.9, "diloco, async-diloco: momentum of the outer Nesterov step")
    outer_delay: int | None = _opt(None, "async-diloco: pushes between two momentum steps of the delayed "
                                         "Nesterov outer optimizer (default: the number of workers)")
    outer_quorum: float = _opt(0.0, "async-diloco: a momentum step once this share of --outer-delay distinct "
                                    "workers has pushed, or once a grace window measured from the workers' "
                                    "push intervals has passed (0: every --outer-delay pushes)")
    exchange_dtype: str = _opt("float32", "ea, diloco and async: the format parameters, differences and "
                                          "pseudo-gradients travel in: a floating type, or int8, int4 (a scale "
                                          "per block) or topk (the largest entries at 2 bits), these three with "
                                          "error feedback (center and sums stay float32)",
                               choices=("float32", "float16", "bfloat16", "int8", "int4", "topk"))
    topk_fraction: float = _opt(0.02, "--exchange-dtype topk: the fraction of each chunk's entries sent")
    fragments: int = _opt(1, "diloco: streaming DiLoCo's fragments, a round every tau / fragments steps on the "
                             "next one (each moves 1 / fragments of the bytes)")
    overlap_steps: int = _opt(0, "diloco: local steps each round overlaps (nonblocking; < tau / fragments)")
    mixing: float = _opt(0.0, "diloco: a fragment becomes mixing * x + (1 - mixing) * center when its round lands "
                              "(0: the center; 0.5 is streaming DiLoCo's choice with --overlap-steps)")
    max_staleness: int = _opt(0, "async: an exchange whose worker missed more than K center updates since its "
                                 "previous one moves the center by K / staleness of what it would (0: off)")
    groups: str = _opt("1", "async: workers train in groups of this many ranks (or 'node': those sharing a node); "
                            "a group averages every --group-tau steps, and its first rank exchanges with the "
                            "server for all of it")
    group_tau: int = _opt(0, "async with --groups: local steps between two averages within a group (0: tau)")
    servers: int = _opt(1, "async: server ranks the center is split over (ranks 0..S-1, one contiguous shard "
                           "each); a worker's exchange goes to all of them at once")
    overlap_exchange: bool = _opt(False, "async: send the parameters and keep taking local steps while the reply "
                                         "is in flight; the move then uses the parameters that were sent")
    seed: int = _opt(0, "seed for initialisation and data order")
    device: str = _opt("cpu", "cpu, cuda (one GPU per rank by node-local rank) or auto", choices=DEVICES)
    cuda_aware: str = _opt("auto", "GPU buffers straight to MPI (yes), staged through host memory (no), "
                                   "or ask the MPI library (auto; $MPI_EASGD_CUDA_AWARE overrides)",
                           choices=("auto", "yes", "no"))
    threads: int = _opt(0, "torch threads per rank (0: cores on this node / ranks on it)")
    uneven: bool = _opt(False, "give ranks uneven shards (last partial batch kept)")
    augment: bool = _opt(False, "random crop (pad 4) and horizontal flip of training images")
    prefetch: int = _opt(2, "training batches prepared ahead in a background thread (0: off)")
    test_every: float = _opt(2.0, "async: seconds between tests of the center")
    worker_timeout: float = _opt(300.0, "async: end the job when a worker, the server, or (at the end) "
                                        "the tester is silent this many seconds")
    out: str = _opt("runs", "parent directory of the run directory")
    run_name: str = _opt("", "run directory name (default: ALGO-MODEL-YYYYmmdd-HHMMSS)")
    progress: bool = _opt(True, "show a progress bar")
    tensorboard: bool = _opt(False, "also write TensorBoard scalars to RUN_DIR/tensorboard")
    audit: bool = _opt(False, "async: log every exchange to verify the center (small models)")
    checkpoint_every: str = _opt("", "checkpoint every N steps (500; async: center updates) or "
                                     "a time (1h, 10m, 30s)")
    resume: str = _opt("", "resume from a checkpoint: RUN_DIR, RUN_DIR/checkpoints/step-N, or auto")
    on_worker_loss: str = _opt("abort", "async: a worker silent for --worker-timeout (or, under mpirun --with-ft "
                                        "ulfm, dead) ends the job (abort), or is dropped while the others go on "
                                        "(continue), or if it died is replaced by a new process (respawn; ULFM)",
                               choices=("abort", "continue", "respawn"))
    accept_joiners: bool = _opt(False, "async: let workers started later join the run (python -m mpi_easgd.join "
                                       "RUN_DIR; MPICH, or Open MPI in one DVM)")
    on_rank_loss: str = _opt("abort", "sgd, ea, diloco under mpirun --with-ft ulfm: a rank that dies ends the job "
                                      "(abort), or the survivors go on, the data re-sharded over them (shrink)",
                             choices=("abort", "shrink"))
    keep_global_batch: bool = _opt(False, "sgd, ea, diloco: after a shrink or a resume at another size, keep the "
                                          "global batch (--batch-size x the ranks the run started with): each rank "
                                          "takes its share, in micro-batches of --batch-size")
    on_nonfinite: str = _opt("skip", "a NaN/Inf loss or gradient: skip the step, or stop the job",
                             choices=("skip", "stop"))

    # ---- loading -------------------------------------------------------------------

    @classmethod
    def field_types(cls) -> dict[str, type]:
        hints = typing.get_type_hints(cls)
        out = {}
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
                t = next(a for a in typing.get_args(t) if a is not type(None))
            out[f.name] = t
        return out

    @classmethod
    def from_mapping(cls, values: dict, source: str, base: Config | None = None) -> Config:
        """A config from ``base`` (or the defaults) with ``values`` applied, type-checked."""
        types_ = cls.field_types()
        cfg = dataclasses.replace(base) if base is not None else cls()
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in types_:
                known = ", ".join(sorted(types_))
                raise ConfigError(f"unknown config key '{key}' in {source}; known keys: {known}")
            setattr(cfg, name, _coerce(name, value, types_[name], source))
        return cfg

    @classmethod
    def from_toml(cls, path: str | Path, base: Config | None = None) -> Config:
        path = Path(path)
        try:
            with path.open("rb") as fh:
                values = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found; check the path given to --config") from None
        except OSError as exc:  # a directory, no permission, ...
            raise ConfigError(f"config file {path} cannot be read ({exc.strerror}); pass a TOML file to "
                              f"--config") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        return cls.from_mapping(values, str(path), base)

    # ---- validation ------------------------------------------------------------------

    def validate(self) -> None:
        """Check every value that needs no knowledge of the world size."""
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1; got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1; got {self.batch_size}"),
            (self.lr is None or self.lr > 0, f"--lr must be > 0; got {self.lr}"),
            (self.momentum is None or 0 <= self.momentum < 1,
             f"--momentum must be in [0, 1); got {self.momentum}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0; got {self.weight_decay}"),
            (self.tau >= 1, f"--tau must be an integer >= 1 (local steps between exchanges); got {self.tau}"),
            (self.alpha is None or 0 < self.alpha < 1,
             f"--alpha must be in (0, 1) (the elastic coefficient per worker); got {self.alpha}"),
            (self.outer_lr > 0, f"--outer-lr must be > 0; got {self.outer_lr}"),
            (0 <= self.outer_momentum < 1, f"--outer-momentum must be in [0, 1); got {self.outer_momentum}"),
            (self.outer_delay is None or self.outer_delay >= 1,
             f"--outer-delay must be an integer >= 1 (pushes per momentum step); got {self.outer_delay}"),
            (1 <= self.fragments <= self.tau,
             f"--fragments must be an integer in [1, --tau {self.tau}]; got {self.fragments}"),
            (0 <= self.overlap_steps < max(1, self.tau // self.fragments),
             f"--overlap-steps must be in [0, tau // fragments) = [0, {self.tau // max(1, self.fragments)}) "
             f"(at most one round in flight); got {self.overlap_steps}"),
            (0 <= self.mixing < 1, f"--mixing must be in [0, 1); got {self.mixing}"),
            (self.max_staleness >= 0, f"--max-staleness must be an integer >= 0 (0: off); got {self.max_staleness}"),
            (self.servers >= 1, f"--servers must be an integer >= 1 (server ranks); got {self.servers}"),
            (0 <= self.outer_quorum <= 1, f"--outer-quorum must be in [0, 1] (0: off); got {self.outer_quorum}"),
            (self.groups == "node" or (self.groups.isdigit() and int(self.groups) >= 1),
             f"--groups must be a number of ranks >= 1 or 'node'; got '{self.groups}'"),
            (self.group_tau >= 0, f"--group-tau must be an integer >= 0 (0: tau); got {self.group_tau}"),
            (self.prefetch >= 0, f"--prefetch must be >= 0; got {self.prefetch}"),
            (self.threads >= 0, f"--threads must be >= 0 (0 = automatic); got {self.threads}"),
            (self.test_every > 0, f"--test-every must be > 0 seconds; got {self.test_every}"),
            (self.worker_timeout > 0, f"--worker-timeout must be > 0 seconds; got {self.worker_timeout}"),
            (0 <= self.seed < 2**32, f"--seed must be in [0, 2**32); got {self.seed}"),
            ("/" not in self.run_name, f"--run-name must be a plain name, not a path; got '{self.run_name}'"),
        ]
        for f in dataclasses.fields(self):  # TOML values bypass argparse's choices
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}; "
                                  f"got '{getattr(self, f.name)}'")
        for name in ("lr", "momentum", "weight_decay", "alpha", "outer_lr", "outer_momentum", "test_every",
                     "worker_timeout", "outer_quorum"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number; got {value}")
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        try:
            parse_every(self.checkpoint_every)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        try:
            uses = registry.lookup(self.algo).uses
        except registry.AlgorithmError as exc:
            raise ConfigError(str(exc)) from None
        if self.on_worker_loss != "abort" and "on_worker_loss" not in uses:
            raise ConfigError(
                f"--on-worker-loss {self.on_worker_loss} needs an asynchronous algorithm "
                f"({', '.join(registry.using('on_worker_loss'))}): {self.algo}'s collectives cannot go on without a "
                f"rank; use --on-worker-loss abort (or, under mpirun --with-ft ulfm, --on-rank-loss shrink)"
            )
        if self.on_rank_loss == "shrink" and "on_rank_loss" not in uses:
            raise ConfigError(f"--on-rank-loss shrink applies to {_listed(registry.using('on_rank_loss'))}; "
                              f"{self.algo} goes on without a dead worker with --on-worker-loss continue (or respawn)")
        if self.keep_global_batch and "keep_global_batch" not in uses:
            raise ConfigError(f"--keep-global-batch applies to {_listed(registry.using('keep_global_batch'))}; an "
                              f"async run's pace is each worker's own (set --alpha for the workers you expect): "
                              f"drop the flag")
        if self.max_staleness and "max_staleness" not in uses:
            raise ConfigError(f"--max-staleness applies to the async algorithms "
                              f"({', '.join(registry.using('max_staleness'))}); {self.algo}'s rounds are never stale: "
                              f"drop the flag")
        if self.outer_quorum and "outer_quorum" not in uses:
            raise ConfigError(f"--outer-quorum applies to {_listed(registry.using('outer_quorum'))}; {self.algo} "
                              f"has no outer momentum step: drop the flag")
        if self.servers != 1 and "servers" not in uses:
            raise ConfigError(f"--servers applies to the async algorithms ({', '.join(registry.using('servers'))}); "
                              f"{self.algo} has no server: drop the flag")
        if self.groups != "1" or self.group_tau:
            if "groups" not in uses:
                raise ConfigError(f"--groups and --group-tau apply to the async algorithms "
                                  f"({', '.join(registry.using('groups'))}); {self.algo} has no server: drop them "
                                  f"(HierarchicalAveraging averages synchronous runs in groups)")
            for bad, flag in ((self.groups == "1", "--group-tau needs --groups"),
                              (self.overlap_exchange, "--groups works with blocking exchanges: drop "
                                                      "--overlap-exchange"),
                              (self.on_worker_loss != "abort", f"--groups works with --on-worker-loss abort; this run "
                                                               f"has {self.on_worker_loss}"),
                              (self.uneven, "--groups needs even shards (every member takes the same steps): "
                                            "drop --uneven")):
                if bad:
                    raise ConfigError(flag)
        if self.accept_joiners and (not registry.lookup(self.algo).is_async or self.servers != 1 or
                                    self.groups != "1"):
            raise ConfigError("--accept-joiners needs an asynchronous algorithm with one server rank and no --groups "
                              "(a joiner talks to the server alone)")
        if self.servers != 1 and self.on_worker_loss == "respawn":
            raise ConfigError(f"--on-worker-loss respawn works with one server rank; this run has --servers "
                              f"{self.servers}: use --on-worker-loss continue, or --servers 1")
        if self.overlap_exchange and "overlap_exchange" not in uses:
            raise ConfigError(f"--overlap-exchange needs an asynchronous algorithm "
                              f"({', '.join(registry.using('overlap_exchange'))}): {self.algo} exchanges in "
                              f"collectives every rank takes part in; drop the flag")
        if self.exchange_dtype != "float32" and "exchange_dtype" not in uses:
            raise ConfigError(f"--exchange-dtype {self.exchange_dtype} applies to ea, diloco and the async "
                              f"algorithms; {self.algo} sums its gradients in float32 (use --exchange-dtype float32)")
        for name, default in (("fragments", 1), ("overlap_steps", 0), ("mixing", 0.0)):
            if getattr(self, name) != default and name not in uses:
                raise ConfigError(f"--{name.replace('_', '-')} applies to {_listed(registry.using(name))} "
                                  f"(streaming DiLoCo); {self.algo} has no fragments: drop the flag")
        if self.topk_fraction != 0.02 and self.exchange_dtype != "topk":
            raise ConfigError(f"--topk-fraction applies only to --exchange-dtype topk (this run has "
                              f"{self.exchange_dtype}); add --exchange-dtype topk or drop --topk-fraction")
        if not 0.0 < self.topk_fraction <= 0.5:
            raise ConfigError(f"--topk-fraction must be in (0, 0.5] (the share of entries sent); "
                              f"got {self.topk_fraction}")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard")

    def resolve(self, workers: int) -> Config:
        """Fill the defaults that depend on the algorithm and the number of workers (those
        that exchange with the server: one per group with ``--groups``)."""
        cfg = dataclasses.replace(self)
        algo = registry.lookup(cfg.algo)
        if cfg.lr is None:
            cfg.lr = 0.001 if cfg.optimizer == "adamw" else algo.default_lr
        if cfg.momentum is None:
            cfg.momentum = algo.default_momentum
        workers = cfg.exchanging(workers)
        if cfg.alpha is None:
            # beta = p * alpha = 0.9 (the paper's choice); one worker gets 0.5, so that neither
            # the worker nor the center is pulled 90% of the way to the other at each exchange.
            cfg.alpha = min(0.9 / workers, 0.5)
        if cfg.outer_delay is None and "outer_delay" in algo.uses:
            # one momentum step per round of pushes: with equal workers, sync DiLoCo's step
            cfg.outer_delay = workers
        return cfg

    def exchanging(self, workers: int) -> int:
        """How many of ``workers`` exchange with the server: one per group with ``--groups N``
        (with ``--groups node`` it is known only when the run starts: ``workers`` here)."""
        return -(-workers // int(self.groups)) if self.groups.isdigit() else workers

    def advice(self, workers: int, shard: int, shape: tuple[int, ...], dataset: str) -> list[str]:
        """Warnings about a resolved configuration that is valid but likely not what was
        meant, for ``workers`` training ranks with ``shard`` training samples each, on
        images of ``shape`` from ``dataset`` (pure: said once by the job, kept in the summary)."""
        notes = []
        algo = registry.lookup(self.algo)
        workers = self.exchanging(workers)  # (the elastic pull is per exchanging worker)
        if algo.elastic and workers * self.alpha >= 1:
            notes.append(f"beta = workers * alpha = {workers * self.alpha:.3g} >= 1: elastic averaging may be "
                         f"unstable; the paper uses beta = 0.9 (--alpha {0.9 / workers:.3g})")
        from mpi_easgd.data.sharding import num_batches

        steps = num_batches(shard, self.batch_size, drop_last=not self.uneven)
        unused = 0 if self.uneven else shard - steps * self.batch_size
        if unused > 0.1 * shard:
            notes.append(f"--batch-size {self.batch_size} leaves {unused} of each rank's {shard} training samples "
                         f"({unused / shard:.0%}) unused every epoch; pass --uneven to use them, or a batch size "
                         f"that divides {shard}")
        if not algo.is_async and "tau" in algo.uses and self.tau > steps:
            kind = "elastic" if algo.elastic else "outer"
            notes.append(f"--tau {self.tau} exceeds the {steps} steps per epoch: the only {kind} rounds are "
                         f"those that finish each epoch; lower --tau to average within epochs")
        if algo.is_async and algo.outer and self.exchange_dtype == "topk" and self.outer_momentum > 0.5:
            notes.append(f"--exchange-dtype topk with async DiLoCo's --outer-momentum {self.outer_momentum:g}: the "
                         f"bursts its residuals release meet the outer momentum, and such runs diverged (mnist5k, "
                         f"2 of 3 seeds at 0.9); --outer-momentum 0.5 kept them stable, or use int4")
        if self.optimizer == "adamw" and self.momentum:
            notes.append(f"--momentum {self.momentum} is not used by --optimizer adamw (its betas are 0.9, 0.999)")
        if self.augment and (shape[0] == 1 or any(k in dataset.lower() for k in ("mnist", "digit"))):
            notes.append("--augment flips images left to right and shifts them, which changes digits and text "
                         "(a mirrored 2 is no digit); it suits natural images such as CIFAR")
        return notes

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


SECONDS = {"s": 1, "m": 60, "h": 3600}


def parse_every(text: str) -> tuple[int | None, float | None]:
    """``"500"`` -> every 500 steps; ``"1h"`` / ``"10m"`` / ``"30s"`` -> every 3600 / 600 / 30 seconds."""
    if not text:
        return None, None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([hms]?)\s*", text)
    if not m or float(m.group(1)) <= 0 or (not m.group(2) and "." in m.group(1)):
        raise ValueError(f"--checkpoint-every must be a number of steps (500) or a time (1h, 10m, 30s); "
                         f"got '{text}'")
    value, unit = float(m.group(1)), m.group(2)
    if not unit:
        return int(value), None
    return None, value * SECONDS[unit]


def _listed(names: tuple[str, ...]) -> str:
    """``a, b and c``."""
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)


def _coerce(name: str, value, typ: type, source: str):
    flag = "--" + name.replace("_", "-")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(
            f"{flag} in {source} must be {typ.__name__}; got {type(value).__name__} {value!r}"
        )
    return value


class _Parser(argparse.ArgumentParser):
    """Raises :class:`ConfigError` instead of printing usage and exiting, so a mistyped
    flag is reported once for the whole job like any other bad input."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see python -m mpi_easgd.train --help)")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: ``--config`` plus one flag per :class:`Config` field."""
    parser = _Parser(
        prog="python -m mpi_easgd.train",
        description="Train with AllReduceSGD/AllReduceEA/AllReduceDiLoCo or asynchronous EASGD/EAMSGD/DOWNPOUR/"
        "async DiLoCo "
        "under MPI (launch with mpirun -np N).",
    )
    parser.add_argument("--config", help="TOML file with any of the keys below")
    for f, typ in zip(dataclasses.fields(Config), Config.field_types().values()):
        flag = "--" + f.name.replace("_", "-")
        # A default of None is resolved later and stated in the help text itself.
        shown = "" if f.default is None else f" (default: {f.default})"
        kw = {"help": f"{f.metadata['help']}{shown}", "default": None}
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(flag, type=typ, choices=f.metadata.get("choices"), **kw)
    return parser


def parse_args(argv: list[str] | None = None) -> Config:
    """Defaults, then the TOML file, then the flags that were given; validated."""
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    cfg = Config.from_toml(config_file) if config_file else Config()
    given = {k: v for k, v in args.items() if v is not None}
    cfg = Config.from_mapping(given, "the command line", cfg)
    cfg.validate()
    return cfg
