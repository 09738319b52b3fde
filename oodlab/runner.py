"""Runs a study with Ray Tune + Optuna + MLflow: ``main`` (a study file's entry point), then prepare, tune, finish.

``prepare`` checks storage and resume state, starts Ray and the MLflow parent run;
``tune`` builds (or restores) the Tune experiment with the Optuna searcher and the
scheduler and runs it; ``finish`` summarises the trials, logs the search plots and the
Pareto front and closes the parent run. Resume (``--resume``) restores the Tune
experiment: finished trials are kept, interrupted ones continue from their last epoch
checkpoint, Optuna and MLflow are not duplicated, ASHA's rungs are reloaded.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oodlab import capacity, data, ray_connect, stores, tags, tune_internals
from oodlab.experiment import ConfigError, metric_name
from oodlab.registry import build_config
from oodlab.space import Space, SpaceError, grid_values
from oodlab.study import (
    Plan,
    StudyError,
    StudyInterrupted,
    StudySpec,
    configure_logging,
    describe_spaces,
    first_point,
    parse_args,
    resolve,
    validate,
)

log = logging.getLogger("oodlab")
# console and tracking (Ray Tune, MLflow: ~1.5 s of imports) are imported inside the steps
# that use them, so bad input is refused within a couple of seconds.

# Save Tune's experiment state every 2 s (Tune's default is ~10 s; 0 = every loop step costs
# ~25% of a training epoch on 2 cores). A SIGKILL inside that window is handled by design:
# the searcher never tells Optuna twice, and a restored trial resumes from its own newest
# checkpoint (trainable.restore), so nothing is trained or counted twice.
STATE_SAVE_S = "2"


@dataclass
class Context:
    plan: Plan
    args: argparse.Namespace
    results: Path
    ray_root: str
    exp_dir: str
    optuna_url: str
    mlflow_uri: str
    asha_file: Path
    exp_id: str = ""
    parent: str = ""
    ot_storage: Any = None  # Optuna storage object (RDB or journal file)
    started: float = 0.0


def run(plan: Plan, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run (or resume) the study; returns one row per trial."""
    import ray

    ctx = prepare(plan, args)
    try:
        grid = tune(ctx)
        return finish(ctx, grid)
    finally:
        ray.shutdown()


# ---------------------------------------------------------------- prepare


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _exists(uri: str) -> bool:
    if not _is_remote(uri):
        return Path(uri.removeprefix("file://")).exists()
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def _check_writable(results: Path) -> None:
    probe = results
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise StudyError(f"--storage {results}: {probe} is not a writable directory")


def _check_resumable(exp_dir: str) -> None:
    """A foreign or corrupt experiment folder fails here, with its path, not inside a trial."""
    import torch
    from ray import tune

    from oodlab.checkpoint import STATE_FILE

    if not tune.Tuner.can_restore(exp_dir):
        raise StudyError(f"--resume: {exp_dir} holds no Ray Tune experiment state (tuner.pkl); "
                         "is it an oodlab study folder?")
    if _is_remote(exp_dir):
        return
    for trial in sorted(Path(exp_dir).glob("trial_*")):
        errors = []
        for ckpt in sorted(trial.glob("checkpoint_*"), reverse=True):
            try:
                torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
                break
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint counts
                errors.append(f"{ckpt / STATE_FILE} cannot be loaded ({type(e).__name__}: {str(e)[:120]})")
        else:
            if errors:  # the trial has checkpoints and none is readable: refuse
                raise StudyError("--resume: " + "; ".join(errors) + f"; delete {trial} to restart that trial")
        if errors:
            log.warning("warning: %s; %s resumes from an older checkpoint", errors[0], trial.name)


def prepare(plan: Plan, args: argparse.Namespace) -> Context:
    """Storage and resume checks, Ray, the MLflow parent run; nothing is written on refusal."""
    from oodlab import tracking
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", STATE_SAVE_S)
    # Only Tune's JSON logger (result.json; no CSV / TensorBoard files per result: less driver work).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if not args.verbose:  # no config box, no "snapshot" warnings: the console callback reports trials
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray

    results = Path(args.storage).resolve()
    ray_root = args.checkpoint_storage or str(results / "ray")
    exp_dir = f"{ray_root.rstrip('/')}/{plan.name}"
    if args.resume and not _exists(exp_dir):
        raise StudyError(f"--resume: no study {plan.name!r} under {ray_root}; run without --resume first")
    if not args.resume and _exists(exp_dir):
        raise StudyError(f"study {plan.name!r} already has results in {exp_dir}; pass --resume to continue it, "
                         "or choose another --name or --storage")
    _check_writable(results)
    if args.resume:
        _check_resumable(exp_dir)
    try:
        optuna_url = stores.optuna_url(getattr(args, "optuna_storage", None), results)
        stores.check_reachable(optuna_url)
        if not stores.is_local_file_store(optuna_url) and not args.resume:
            with stores.creation_lock(optuna_url):
                if stores.study_exists(stores.optuna_storage(optuna_url), plan.name):
                    raise StudyError(f"study {plan.name!r} already exists in --optuna-storage "
                                     f"{stores.redact(optuna_url)}; pass --resume or choose another --name")
        mlflow_uri = stores.hide_password(args.mlflow_uri or stores.default_mlflow_uri(results))
        if not mlflow_uri.startswith("sqlite:"):
            stores.check_reachable(mlflow_uri)  # at once: MLflow itself retries a dead database for minutes
            with stores.creation_lock(mlflow_uri):  # a fresh database is migrated here, once
                tracking.check_reachable(mlflow_uri)
    except (stores.StoreError, ConnectionError) as e:
        raise StudyError(str(e)) from None
    ctx = Context(plan, args, results, ray_root, exp_dir, optuna_url, mlflow_uri,
                  results / "asha" / f"{plan.name}.json")

    quiet = {"log_to_driver": args.verbose, "logging_level": logging.INFO if args.verbose else logging.WARNING}
    target = ray_connect.init(args.address, num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
    log.info("Ray: %s (%s)", "joined " + target.address if target.joins else "local", target.reason)
    try:  # the cluster that can be, not only the nodes up now: refuse, default --gpus-per-trial, or wait
        capacity.check(args, ray_root)
    except (StudyError, KeyboardInterrupt):
        ray.shutdown()
        raise
    results.mkdir(parents=True, exist_ok=True)  # only now: a refused study writes nothing
    stores.remember(results, plan.name, optuna_url, mlflow_uri, ray_root)  # `oodlab report --storage` finds them
    if plan.before_run is not None:
        plan.before_run(plan.fixed)
    params = {"metric": ",".join(plan.targets), "mode": ",".join(plan.modes), "sampler": plan.sampler,
              "scheduler": plan.scheduler, **plan.fixed}
    with stores.creation_lock(ctx.optuna_url):
        ctx.ot_storage = stores.optuna_storage(ctx.optuna_url)
    with stores.creation_lock(ctx.mlflow_uri):  # two studies creating one sqlite mlflow.db race in alembic
        ctx.exp_id, ctx.parent = tracking.setup_study(ctx.mlflow_uri, results / "mlartifacts", plan.name, params)
    tracking.tag_study(ctx.mlflow_uri, ctx.exp_id, ctx.parent, {
        tags.TARGET: ",".join(plan.targets), tags.SAMPLER: plan.sampler, tags.SCHEDULER: plan.scheduler,
        tags.ALLOW_TEST_TARGET: str(plan.allow_test_target).lower()})
    return ctx


# ---------------------------------------------------------------- tune


def make_sampler(name: str, space: Space, multi: bool, seed: int = 0) -> Any:
    import optuna

    if name == "grid":
        return optuna.samplers.GridSampler(grid_values(space), seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)  # single- and multi-objective
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if multi:
        raise StudyError("--sampler cmaes is single-objective; use tpe (or random) for several targets")
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


def _trial_dirname(trial: Any) -> str:
    """Short trial folders (Tune's default embeds the whole config in the name)."""
    return f"trial_{trial.trial_id}"


def tune(ctx: Context) -> Any:
    """Build or restore the Tune experiment and run it; returns Tune's ResultGrid."""
    import optuna
    from ray import tune as rtune

    from oodlab import console, tracking
    from oodlab.space import DefineByRun
    from oodlab.trainable import train

    plan, args = ctx.plan, ctx.args
    ctx.started = time.time()
    fixed = dict(plan.fixed)
    if args.gpus_per_trial == 0:
        fixed["device"] = "cpu"
    trainable = rtune.with_resources(train, {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
    if args.resume:
        log.info("resuming %s from %s", plan.name, ctx.exp_dir)
        keep = tune_internals.known_optuna_trials(Path(ctx.exp_dir)) if not _is_remote(ctx.exp_dir) else None
        orphans = tune_internals.reconcile_optuna(ctx.ot_storage, plan.name, keep=keep or set())
        if orphans:
            log.info("marked %d orphaned Optuna trial(s) FAIL", orphans)
        tuner = rtune.Tuner.restore(ctx.exp_dir, trainable, resume_unfinished=True, resume_errored=True)
        return tuner.fit()
    directions: list[Any] = ["maximize" if m == "max" else "minimize" for m in plan.modes]
    ot_study = optuna.create_study(study_name=plan.name, storage=ctx.ot_storage, load_if_exists=True,
                                   directions=directions)
    ot_study.set_user_attr(tags.OPTUNA_NUM_SAMPLES, plan.num_samples)  # read back on resume: done vs interrupted
    max_epoch = plan.epochs
    searcher = tune_internals.searcher_class()(
        space=DefineByRun.of(plan.space), metric=list(plan.targets) if plan.multi else plan.metric,
        mode=list(plan.modes) if plan.multi else plan.mode, sampler=make_sampler(plan.sampler, plan.space, plan.multi),
        study_name=plan.name, storage=ctx.ot_storage, max_epoch=max_epoch)
    scheduler = None
    if plan.scheduler == "asha":
        ctx.asha_file.parent.mkdir(parents=True, exist_ok=True)
        ctx.asha_file.unlink(missing_ok=True)  # a fresh study: no rungs from an earlier one of this name
        scheduler = tune_internals.persistent_asha(
            ctx.asha_file, time_attr="epoch", metric=plan.metric, mode=plan.mode, max_t=max_epoch,
            grace_period=plan.grace_period, reduction_factor=plan.reduction_factor)
    keys = tuple(plan.space)
    log.info("study %s: %d trials, sampler %s%s, target %s (%s)", plan.name, plan.num_samples, plan.sampler,
             f", scheduler asha (grace {plan.grace_period}, rf {plan.reduction_factor:g}, max {max_epoch} epochs)"
             if scheduler else "", ",".join(plan.targets), ",".join(plan.modes))
    log.info("space: %s", "  ".join(f"{k}={d}" for k, d in plan.space.items()) or "none (one fixed configuration)")
    from ray.tune.logger import JsonLoggerCallback

    callbacks = [JsonLoggerCallback(),
                 tracking.MLflowCallback(ctx.mlflow_uri, ctx.exp_id, ctx.parent, plan.name, name_keys=keys,
                                         max_epoch=max_epoch),
                 console.ConsoleCallback(keys, plan.targets, max_epoch, plan.num_samples),
                 tune_internals.checkpoint_repair()]
    tuner = rtune.Tuner(
        trainable,
        param_space=fixed,
        tune_config=rtune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=plan.num_samples,
                                     # one worker process serves trial after trial: no torch import and
                                     # data load per trial (a 4-trial smoke study 44 s -> 35 s on 2 cores)
                                     reuse_actors=True,
                                     max_concurrent_trials=args.max_concurrent or None,
                                     trial_dirname_creator=_trial_dirname),
        run_config=rtune.RunConfig(
            name=plan.name, storage_path=ctx.ray_root, callbacks=callbacks,
            checkpoint_config=rtune.CheckpointConfig(num_to_keep=2),
            failure_config=rtune.FailureConfig(max_failures=args.max_failures),
            verbose=1 if args.verbose else 0,
        ),
    )
    return tuner.fit()


# ---------------------------------------------------------------- finish


def auroc_columns(plan: Plan) -> list[tuple[str, str]]:
    """(column, metric) for every score's AUROC on the first validation and first test OOD set."""
    cfg = build_config(plan.fixed_with(first_point(plan.space)))
    cols = []
    val = getattr(cfg, "val_ood", ())
    for score in cfg.score_names():
        if val:
            cols.append((f"val {score}", metric_name("auroc", val[0], score, "val")))
        cols.append((f"test {score}", metric_name("auroc", cfg.ood[0], score)))
    return cols


def status_of(result: Any, max_epoch: int) -> str:
    m = result.metrics or {}
    if result.error:
        return "ERROR"
    if m.get("error"):
        return "FAILED"
    if (m.get("epoch") or 0) < max_epoch:
        return f"STOPPED@{m.get('epoch')}" if m.get("epoch") else "STOPPED"
    return "OK"


def summarize(grid: Any, plan: Plan) -> list[dict[str, Any]]:
    """One row per trial: parameters, epochs, status, targets, every score's AUROC (val and test)."""
    max_epoch = plan.epochs
    cols = auroc_columns(plan)
    rows = []
    for r in grid:
        m = r.metrics or {}
        row = {"trial": m.get("trial_id", "?"), **{k: r.config.get(k) for k in plan.space},
               "epochs": m.get("epoch"), "status": status_of(r, max_epoch)}
        row.update({t: m.get(t) for t in plan.targets})
        row.update({c: m.get(metric) for c, metric in cols if metric not in plan.targets})
        rows.append(row)
    return sorted(rows, key=lambda r: [str(r[k]) for k in plan.space])


def _finite(v: Any) -> bool:
    return isinstance(v, float) and math.isfinite(v)


def best_row(rows: list[dict[str, Any]], plan: Plan) -> dict[str, Any] | None:
    """The best finished (not stopped) trial by the single target."""
    done = [r for r in rows if r["status"] == "OK" and _finite(r.get(plan.metric))]
    sign = 1 if plan.mode == "max" else -1
    if not done:
        return None
    return max(done, key=lambda r: sign * float(r[plan.metric]))


def pareto_text(ctx: Context) -> str:
    import optuna

    from oodlab import console

    study = optuna.load_study(study_name=ctx.plan.name, storage=ctx.ot_storage)
    front = sorted(study.best_trials, key=lambda t: t.values[0])
    rows = [{"optuna trial": t.number, **t.params, **dict(zip(ctx.plan.targets, t.values))} for t in front]
    goals = ", ".join(f"{t} {m}" for t, m in zip(ctx.plan.targets, ctx.plan.modes))
    return console.format_table(rows, header=f"Pareto front ({goals})")


def finish(ctx: Context, grid: Any) -> list[dict[str, Any]]:
    """Summary table, best trial or Pareto front, search plots; close the parent run."""
    import optuna

    from oodlab import console, study_plots, tracking

    plan = ctx.plan
    rows = summarize(grid, plan)
    cols = auroc_columns(plan)
    cfg = build_config(plan.fixed_with(first_point(plan.space)))
    header = (f"AUROC per score: 'val' = held-out ID vs {getattr(cfg, 'val_ood', ('-',))[0]} (selection), "
              f"'test' = ID test vs {cfg.ood[0]} (reported)") if cols else ""
    table = console.format_table(rows, header=header)
    log.info("trials:\n%s", table)
    ot_study = optuna.load_study(study_name=plan.name, storage=ctx.ot_storage)
    n = ot_study.user_attrs.get(tags.OPTUNA_NUM_SAMPLES, len(grid))
    if len(grid) < n or grid.num_terminated + grid.num_errors < len(grid):
        tracking.finish_study(ctx.mlflow_uri, ctx.parent, {}, {"trials.md": table}, status="KILLED")
        raise StudyInterrupted(f"study {plan.name} interrupted; its state is saved: rerun with --resume")
    stale = tune_internals.reconcile_optuna(ctx.ot_storage, plan.name)
    if stale:
        log.info("marked %d orphaned Optuna trial(s) FAIL", stale)
    lost = tracking.reconcile_runs(ctx.mlflow_uri, ctx.exp_id, {str(r["trial"]) for r in rows})
    if lost:
        log.info("closed %d orphaned MLflow trial run(s) as KILLED", lost)
    files = {"trials.md": table}
    summary: dict[str, float] = {
        "trials_finished": sum(r["status"] == "OK" for r in rows),
        "trials_stopped_early": sum(r["status"].startswith("STOPPED") for r in rows),
        "trials_failed": sum(r["status"] in ("FAILED", "ERROR") for r in rows),
        "epochs_trained": float(sum(r["epochs"] or 0 for r in rows)),
    }
    if plan.multi:
        front = pareto_text(ctx)
        log.info("%s", front)
        files["pareto_front.md"] = front
    else:
        best = best_row(rows, plan)
        if best:
            log.info("best %s = %.4f with %s", plan.metric, best[plan.metric],
                     console.params_text(best, tuple(plan.space), sep=", "))
            summary[f"best_{plan.metric}"] = best[plan.metric]
            for c, metric in cols:  # every AUROC of the configuration the target selected
                v = best.get(metric if metric in plan.targets else c)
                if isinstance(v, float) and math.isfinite(v):
                    summary[f"selected_{metric}"] = v
    with tempfile.TemporaryDirectory() as d:
        figures = study_plots.search_figures(ot_study, rows, plan, Path(d))
        summary["wall_s"] = time.time() - ctx.started
        tracking.finish_study(ctx.mlflow_uri, ctx.parent, summary, files, figures=figures)
    log.info("results in %s", ctx.results)
    log.info("browse: %s", tracking.browse_hint(ctx.results, stores.redact(ctx.mlflow_uri), ctx.exp_id))
    return rows


def run_spec(spec: StudySpec, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Resolve, validate and run (or resume) a study; returns one row per trial."""
    plan = resolve(spec, args)
    validate(plan, args)
    return run(plan, args)


def main(study_file: str, build: Callable[[argparse.Namespace], StudySpec],
         configure: Callable[[argparse.ArgumentParser], None], argv: list[str] | None = None,
         space: dict[str, Any] | None = None, grid: dict[str, Any] | None = None) -> int:
    """Entry point of a study file: parse flags, build the spec, run; clear errors, exit 2."""
    doc = getattr(sys.modules.get("__main__"), "__doc__", None)
    args = parse_args(study_file, configure, argv, doc=doc,
                      epilog=describe_spaces(space, grid) if space is not None else None)
    configure_logging(args.verbose)
    try:
        spec = build(args)
        run_spec(spec, args)
    except (StudyError, ConfigError, SpaceError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StudyInterrupted as e:
        print(f"[oodlab] {e}", file=sys.stderr)
        return 130
    return 0
