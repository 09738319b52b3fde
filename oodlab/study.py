"""Study files' shared entry: flags, the study spec, resolving it into a plan, validation.

A study file (``studies/*.py``) declares its paper's search space and grid as data
(``oodlab.space``), builds a ``StudySpec`` from its flags and calls ``oodlab.runner.main``; ``resolve``
applies the shared flags (``--sampler``, ``--space``, ``--set``, ``--target``, ``--seeds``…)
and ``validate`` runs every check that can fail before Ray starts. ``oodlab.runner`` runs
the resulting ``Plan``. Everything a study writes lives under ``--storage``:

    mlflow.db      MLflow tracking store (parent run per study, child run per trial)
    mlartifacts/   MLflow artifacts (ROC / histogram PNGs, scores.npz, metrics.json, search plots)
    optuna.db      Optuna storage (study name = study file's stem)
    ray/<study>/   Ray Tune experiment state and trial checkpoints
    asha/<study>.json  ASHA's rungs (with --scheduler asha), so a resume does not reset them

unless ``--mlflow-uri``, ``--optuna-storage`` or ``--checkpoint-storage`` point elsewhere
(databases, S3, NFS: ``oodlab.stores``). Ray: ``oodlab.ray_connect`` decides where to connect.

Model selection uses validation metrics (``val_…``: held-out ID training images against
validation OOD sets); test metrics are reported for every trial but are a target only with
``--allow-test-target``, which the parent run records.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oodlab import data
from oodlab.experiment import ConfigError
from oodlab.naming import is_val_metric, metric_name, mode_of
from oodlab.registry import build_config
from oodlab.space import (
    Categorical,
    Space,
    SpaceError,
    as_space,
    coerce,
    describe,
    field_types,
    grid_size,
    grid_values,
    parse_dimension,
    split_assignment,
    typed,
)

SAMPLERS = ("grid", "tpe", "random", "cmaes")
SCHEDULERS = ("fifo", "asha")
log = logging.getLogger("oodlab")


class StudyError(RuntimeError):
    """A study that cannot start (bad flags, missing resources, existing results)."""


class StudyInterrupted(RuntimeError):
    """The study stopped early (Ctrl-C / SIGINT); its state is saved for ``--resume``."""


@dataclass(frozen=True)
class ValTarget:
    """A study's default target: ``metric`` of ``score`` on the first validation OOD set of the
    final config (after ``--val-ood`` / ``--set val_ood=…``), e.g. ``val_auroc_blobs_bpd``."""

    metric: str
    score: str

    def name(self, fixed: dict[str, Any]) -> str:
        return val_metric(fixed, self.metric, self.score)


@dataclass(frozen=True)
class StudySpec:
    """What a study file declares. ``space``: the papers' ranges (searched by tpe, random,
    cmaes); ``grid``: the paper's grid (the grid sampler; None = ``space``). Dimensions are
    ``oodlab.space`` objects or lists (categorical). Seeds are never a dimension (``--seeds``)."""

    name: str  # MLflow experiment, Optuna study and Ray experiment folder
    fixed: dict[str, Any]  # TrialConfig fields shared by every trial
    space: dict[str, Any]
    metric: str | ValTarget | Sequence[str | ValTarget]  # default target(s), e.g. ValTarget("auroc", "bpd")
    mode: str | Sequence[str] = "max"
    grid: dict[str, Any] | None = None
    num_samples: int | None = None  # default: the grid's size
    paper_point: dict[str, Any] = field(default_factory=dict)  # the paper's chosen values (marked in plots)
    before_run: Callable[[dict[str, Any]], None] | None = None  # driver work after validation (e.g. a shared VAE)


@dataclass(frozen=True)
class Plan:
    """A study ready to run: every flag applied and checked."""

    name: str
    fixed: dict[str, Any]
    space: Space  # what Optuna searches (the grid with --sampler grid); never the seed
    targets: tuple[str, ...]
    modes: tuple[str, ...]
    sampler: str
    scheduler: str
    num_samples: int
    allow_test_target: bool = False
    grace_period: int = 1
    reduction_factor: float = 2.0
    paper_point: dict[str, Any] = field(default_factory=dict)
    before_run: Callable[[dict[str, Any]], None] | None = field(default=None, compare=False)

    @property
    def multi(self) -> bool:
        return len(self.targets) > 1

    @property
    def metric(self) -> str:
        return self.targets[0]

    @property
    def mode(self) -> str:
        return self.modes[0]

    @property
    def epochs(self) -> int:
        return int(build_config(self.fixed_with(first_point(self.space))).epochs)

    def fixed_with(self, point: dict[str, Any]) -> dict[str, Any]:
        return {**self.fixed, **point}


# ---------------------------------------------------------------- flags


def add_common_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("study (shared by every study file)")
    g.add_argument("--smoke", action="store_true", help="tiny subsets, 1 epoch: a few minutes on 2 CPU cores")
    g.add_argument("--resume", action="store_true", help="continue an interrupted study from its storage")
    g.add_argument("--storage", default="oodlab-results", help="results root (default ./oodlab-results)")
    g.add_argument("--name", help="study name (default: the study file's stem, + '-smoke' with --smoke)")
    g.add_argument("-v", "--verbose", action="store_true", help="Tune's full progress output, Optuna's and Ray's logs")
    g = p.add_argument_group("search (shared by every study file)")
    g.add_argument("--sampler", choices=SAMPLERS, default="grid",
                   help="Optuna sampler (default grid = the paper's grid; tpe/random/cmaes search the paper's ranges)")
    g.add_argument("--num-samples", type=int, help="number of trials (default: the size of the paper's grid)")
    g.add_argument("--seeds", type=int, help="replicates per trial: each trial trains seeds 0..N-1 of its "
                   "configuration and reports their mean (and sd as {metric}_sd); default 1")
    g.add_argument("--space", action="append", default=[], metavar="KEY=SPEC",
                   help="add or replace a dimension: a,b,c | lo..hi | lo..hi:log | lo..hi:int (repeatable)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix any config field (typed by the method's config; repeatable)")
    g.add_argument("--target", help="metric(s) to optimise, comma-separated for multi-objective "
                   "(default: the study's validation metric)")
    g.add_argument("--mode", help="max|min per target, comma-separated (default: min for error rates, "
                   "fpr*, nll/bpd means, val_id_*, else max)")
    g.add_argument("--allow-test-target", action="store_true",
                   help="allow a test-set metric as target (recorded on the MLflow parent run)")
    g.add_argument("--val-ood", metavar="SPEC[,SPEC...]", help="validation OOD set(s) (config field val_ood)")
    g.add_argument("--scheduler", choices=SCHEDULERS, default="fifo",
                   help="fifo: every trial runs all epochs; asha: ASHA stops weak trials early (not with grid)")
    g.add_argument("--grace-period", type=int, help="ASHA: epochs before a trial can be stopped (default eval_every)")
    g.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: keep 1/RF of trials per rung (default 2)")
    g = p.add_argument_group("resources and data size (shared by every study file)")
    g.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster address (default: local Ray)")
    g.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs per trial; fractions share a GPU (default: 0.5 where the cluster has or can add "
                   "GPU nodes, else 0; oodlab.capacity)")
    g.add_argument("--wait-for-nodes", type=float, metavar="SECONDS",
                   help="give up (exit 2) when the autoscaler has not added a node for one trial within SECONDS "
                   "(default: wait)")
    g.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial")
    g.add_argument("--max-concurrent", type=int, default=0,
                   help="cap on trials running at once (0 = as resources allow)")
    g.add_argument("--max-failures", type=int, default=1,
                   help="retries of a trial whose worker died, from its last checkpoint (default 1)")
    g.add_argument("--checkpoint-storage", help="where Ray keeps experiment state and checkpoints: a shared "
                   "path (NFS) or s3://bucket/prefix so any node can resume any trial (default <storage>/ray)")
    g.add_argument("--optuna-storage", default=os.environ.get("OODLAB_OPTUNA_STORAGE") or None,
                   help="Optuna storage URL: sqlite:///…, postgresql://…, mysql://… or journal:///abs/file.log "
                   "(NFS) (default $OODLAB_OPTUNA_STORAGE, else sqlite:///<storage>/optuna.db)")
    g.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db)")
    g.add_argument("--epochs", "--max-epochs", dest="epochs", type=int,
                   help="training epochs per trial (ASHA's maximum)")
    g.add_argument("--train-n", type=int, help="use only this many ID training images")
    g.add_argument("--test-n", type=int, help="score only this many images of each test set")


def add_config_flags(group: argparse._ArgumentGroup, config: type, helps: dict[str, str]) -> None:
    """A flag per config field named in ``helps`` (``--batch-size`` for ``batch_size``) whose default is the
    config's own: written once, in the dataclass, and shown in ``--help``; a flag not given leaves it."""
    types = field_types(config)
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for name, text in helps.items():
        flag = "--" + name.replace("_", "-")
        if types[name] is bool:
            group.add_argument(flag, action="store_true", default=None, help=text)
        else:
            group.add_argument(flag, default=None, metavar=name.upper(), help=f"{text} (default {defaults[name]})")


def config_flags(args: argparse.Namespace, config: type, names: Iterable[str]) -> dict[str, Any]:
    """The config fields given as flags (``add_config_flags``), typed; SpaceError (exit 2) for a bad value."""
    types = field_types(config)
    return {n: coerce(types[n], getattr(args, n), n) for n in names if getattr(args, n, None) is not None}


SMOKE = {"epochs": 1, "train_n": 2000, "test_n": 500}


def common_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Fixed-config entries that come from the shared flags."""
    out = dict(SMOKE) if args.smoke else {}
    for key in ("epochs", "train_n", "test_n"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    return out


def default_name(study_file: str, args: argparse.Namespace) -> str:
    return args.name or Path(study_file).stem + ("-smoke" if args.smoke else "")


def val_metric(fixed: dict[str, Any], metric: str, score: str) -> str:
    """The validation metric ``val_{metric}_{first val set}_{score}`` of a config."""
    return metric_name(metric, build_config(fixed).val_ood[0], score, "val")


# ---------------------------------------------------------------- resolve: flags -> plan


def first_point(space: Space) -> dict[str, Any]:
    return {k: d.ends()[0] for k, d in space.items()}


def _config_types(fixed: dict[str, Any]) -> dict[str, Any]:
    try:
        return field_types(type(build_config(fixed)))
    except ConfigError as e:
        raise StudyError(f"bad configuration: {e}") from None


def _known(key: str, types: dict[str, Any], flag: str) -> None:
    if key not in types:
        raise StudyError(f"{flag}: unknown config key {key!r}; known: {', '.join(sorted(types))}")


def resolve(spec: StudySpec, args: argparse.Namespace) -> Plan:
    """Apply the shared flags to a study's spec; every error here is a StudyError (exit 2)."""
    try:
        return _resolve(spec, args)
    except SpaceError as e:
        raise StudyError(str(e)) from None


def _resolve(spec: StudySpec, args: argparse.Namespace) -> Plan:
    sampler = args.sampler
    fixed, space = _apply_flags(spec, args)
    targets, modes = _targets(spec, args, {**fixed, **first_point(space)})
    test_targets = [t for t in targets if not is_val_metric(t)]
    if test_targets and not args.allow_test_target:
        raise StudyError(f"target {', '.join(test_targets)} is a test-set metric: selecting hyperparameters on the "
                         "test set leaks it into the result; use a val_ metric or pass --allow-test-target")
    _check_search(args, sampler, targets)
    plan = Plan(name=spec.name, fixed=fixed, space=space, targets=targets, modes=modes, sampler=sampler,
                scheduler=args.scheduler, num_samples=_num_samples(spec, args, space),
                allow_test_target=bool(test_targets), reduction_factor=args.reduction_factor,
                paper_point=dict(spec.paper_point), before_run=spec.before_run)
    if plan.scheduler == "asha":
        plan = dataclasses.replace(plan, grace_period=_grace_period(plan, args.grace_period))
    if sampler == "cmaes" and all(isinstance(d, Categorical) for d in space.values()):
        log.warning("cmaes over categorical dimensions only: Optuna samples them at random")
    return plan


def _apply_flags(spec: StudySpec, args: argparse.Namespace) -> tuple[dict[str, Any], Space]:
    """The fixed config and the searched space after ``--set``, ``--val-ood``, ``--space`` and ``--seeds``:
    typed by the method's config, a grid of categoricals for the grid sampler. Seeds are replicates
    inside each trial (config field ``seeds``), never a searched dimension."""
    base = spec.grid if args.sampler == "grid" and spec.grid is not None else spec.space
    space = as_space(base)
    fixed = dict(spec.fixed)
    types = _config_types(fixed)
    sets = [(*split_assignment(s, "--set"), "--set") for s in args.set]
    if args.val_ood:
        sets.append(("val_ood", args.val_ood, "--val-ood"))
    dims = [split_assignment(s, "--space") for s in args.space]
    clash = {k for k, _, _ in sets} & {k for k, _ in dims}
    if clash:
        raise StudyError(f"{', '.join(sorted(clash))}: given to both --set and --space")
    for key, value, flag in sets:
        _known(key, types, flag)
        fixed[key] = coerce(types[key], value, key)
        space.pop(key, None)  # a fixed field is no longer searched
    for key, text in dims:
        _known(key, types, "--space")
        space[key] = parse_dimension(text)
        fixed.pop(key, None)
    replicate_keys = sorted({"seed", "seeds"} & set(space))
    if replicate_keys:
        raise StudyError(f"{', '.join(replicate_keys)} cannot be searched: seeds are replicates inside each trial; "
                         "use --seeds N (and --set seed=K for the first seed)")
    if args.seeds is not None:
        if "seeds" in {k for k, _, _ in sets}:
            raise StudyError("seeds: given to both --seeds and --set")
        fixed["seeds"] = args.seeds
    for key in space:
        _known(key, types, "space of the study")
    space = {k: typed(d, types[k], k) for k, d in space.items()}
    if args.sampler == "grid":
        space = {k: Categorical(tuple(v)) for k, v in grid_values(space).items()}  # FloatRange: SpaceError
    return fixed, space


def _num_samples(spec: StudySpec, args: argparse.Namespace, space: Space) -> int:
    """``--num-samples``, else the study's own count, else the paper grid's size, so every sampler
    gets the grid's budget (one trial for a study that searches nothing)."""
    if args.num_samples is not None and args.num_samples < 1:
        raise StudyError(f"--num-samples must be >= 1, got {args.num_samples}")
    paper_grid = space if args.sampler == "grid" or spec.grid is None else as_space(spec.grid)
    return args.num_samples or spec.num_samples or grid_size(paper_grid) or 10


def _targets(spec: StudySpec, args: argparse.Namespace, point: dict[str, Any]) -> tuple[tuple[str, ...], ...]:
    """(targets, modes): ``--target``/``--mode``, else the study's defaults; a mode not given follows
    the metric's direction (``naming.mode_of``)."""
    defaults = (spec.metric,) if isinstance(spec.metric, (str, ValTarget)) else tuple(spec.metric)
    try:
        targets = tuple(t.strip() for t in args.target.split(",")) if args.target else tuple(
            t.name(point) if isinstance(t, ValTarget) else t for t in defaults)
    except ConfigError as e:
        raise StudyError(f"bad configuration: {e}") from None
    if args.mode:
        modes = tuple(m.strip() for m in args.mode.split(","))
    elif args.target:
        modes = tuple(mode_of(t) for t in targets)
    else:
        modes = (spec.mode,) * len(targets) if isinstance(spec.mode, str) else tuple(spec.mode)
    if len(modes) != len(targets) or any(m not in ("min", "max") for m in modes):
        raise StudyError(f"--mode: give max or min for each of the {len(targets)} target(s), got {modes}")
    return targets, modes


def _check_search(args: argparse.Namespace, sampler: str, targets: tuple[str, ...]) -> None:
    """Sampler, scheduler and target combinations that cannot work."""
    if sampler == "cmaes" and len(targets) > 1:
        raise StudyError("--sampler cmaes is single-objective; use tpe (or random) for several targets")
    if args.seeds is not None and not 1 <= args.seeds <= 100:
        raise StudyError(f"--seeds must be in 1..100, got {args.seeds}")
    if args.scheduler != "asha":
        return
    if sampler == "grid":
        raise StudyError("--scheduler asha stops trials early; the grid sampler needs one completed trial per "
                         "grid point: use --sampler tpe, random or cmaes")
    if len(targets) > 1:
        raise StudyError("--scheduler asha ranks trials on one metric: give a single --target")
    if args.reduction_factor <= 1:
        raise StudyError(f"--reduction-factor must be > 1, got {args.reduction_factor}")


def _grace_period(plan: Plan, grace: int | None) -> int:
    """ASHA's grace period: ``--grace-period`` or the config's eval_every, within [eval_every, epochs]."""
    cfg = build_config(plan.fixed_with(first_point(plan.space)))
    grace = grace if grace is not None else cfg.eval_every
    if grace < cfg.eval_every or grace > cfg.epochs:
        raise StudyError(f"--grace-period {grace}: must be >= eval_every ({cfg.eval_every}; metrics are new only "
                         f"at evaluations) and <= epochs ({cfg.epochs})")
    return grace


# ---------------------------------------------------------------- validate: before any compute


def check_points(space: Space) -> list[dict[str, Any]]:
    """Configurations that exercise every value of a categorical and both ends of a range,
    one dimension at a time from the first point (not the whole product)."""
    first = first_point(space)
    points = [first]
    for key, dim in space.items():
        points += [{**first, key: v} for v in dim.ends()[1:]]
    return points


def validate(plan: Plan, args: argparse.Namespace) -> None:
    """Every check that can fail before Ray starts: configs, targets, data files, flags."""
    wait = getattr(args, "wait_for_nodes", None) or 0
    if (args.gpus_per_trial or 0) < 0 or args.cpus_per_trial <= 0 or wait < 0:
        raise StudyError("--gpus-per-trial and --wait-for-nodes must be >= 0 and --cpus-per-trial > 0")
    if (args.gpus_per_trial or 0) > 1 and not float(args.gpus_per_trial).is_integer():
        raise StudyError(f"--gpus-per-trial above 1 must be a whole number, got {args.gpus_per_trial}")
    try:
        configs = [build_config(plan.fixed_with(p)) for p in check_points(plan.space)]
    except ConfigError as e:
        raise StudyError(f"bad configuration: {e}") from None
    known = configs[0].metric_names()
    unknown = [t for t in plan.targets if t not in known]
    if unknown:
        raise StudyError(f"target metric {', '.join(unknown)} is not reported; reported: {', '.join(known)}")
    sets: dict[tuple[str, str, bool], data.SetInfo] = {}
    try:  # load every set once: a missing file, a model that does not fit the data, a too large val_n fail here
        for cfg in configs:
            for req in cfg.data_requests():
                if (*req, cfg.pad) not in sets:
                    sets[(*req, cfg.pad)] = data.load(*req, pad_to=32 if cfg.pad else None).info()
            by_request = {req: sets[(*req, cfg.pad)] for req in cfg.data_requests()}
            cfg.check_data(by_request)
            cfg.check_sizes({req: info.n for req, info in by_request.items()})
    except (data.DataError, ConfigError) as e:
        raise StudyError(str(e)) from None


# ---------------------------------------------------------------- entry


def describe_spaces(space: dict[str, Any] | None, grid: dict[str, Any] | None) -> str:
    lines = ["search space (--sampler tpe|random|cmaes; --space KEY=SPEC adds or replaces a dimension):",
             "  " + describe(as_space(space or {}))]
    if grid is not None:
        lines += ["paper grid (--sampler grid, the default):", "  " + describe(as_space(grid))]
    lines += ["--seeds N trains N replicates (seeds 0..N-1) in every trial; --set KEY=VALUE fixes any config field."]
    return "\n".join(lines)


def parse_args(study_file: str, configure: Callable[[argparse.ArgumentParser], None],
               argv: list[str] | None = None, doc: str | None = None, epilog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=Path(study_file).name, description=doc, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(p)
    add_common_flags(p)
    return p.parse_args(argv)


def configure_logging(verbose: bool) -> None:
    """The CLI's console: one ``[oodlab]`` line per event on stdout; library loggers stay quiet."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[oodlab] %(message)s"))
    root = logging.getLogger("oodlab")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    if not verbose:
        import optuna

        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # "Creating initial MLflow database tables…"
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "created / using existing study" pair
        logging.getLogger("oodlab.ray_connect").setLevel(logging.WARNING)  # the runner prints one "Ray:" line
        # GridSampler stops the study when the grid is done; OptunaSearch logs that as a warning
        logging.getLogger("ray.tune.search.optuna.optuna_search").setLevel(logging.ERROR)
        # "Processing trial results took 0.9 s": the final report's artifact upload, not a problem
        logging.getLogger("ray.tune.utils.util").setLevel(logging.ERROR)
