"""Study runner: wires a search space to the trainable with Ray Tune + Optuna + MLflow.

A study file (``studies/*.py``) builds a ``StudySpec`` from its flags and calls ``main``.
Everything a study writes lives under ``--storage`` (default ``./oodlab-results``):

    mlflow.db      MLflow tracking store (parent run per study, child run per trial)
    mlartifacts/   MLflow artifacts (ROC / histogram PNGs, scores.npz, metrics.json)
    optuna.db      Optuna storage (study name = study file's stem)
    ray/<study>/   Ray Tune experiment state and trial checkpoints

Resume (``--resume``) restores the Tune experiment: finished trials are kept, interrupted
ones continue from their last epoch checkpoint, Optuna and MLflow are not duplicated.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oodlab import data, ray_connect, stores
from oodlab.experiment import ConfigError
from oodlab.registry import build_config

SAMPLERS = ("grid", "tpe", "random")


class StudyError(RuntimeError):
    """A study that cannot start (bad flags, missing resources, existing results)."""


@dataclass(frozen=True)
class StudySpec:
    name: str  # study name: MLflow experiment, Optuna study and Ray experiment folder
    fixed: dict[str, Any]  # TrialConfig fields shared by every trial
    space: dict[str, list]  # categorical grid searched by Optuna, e.g. {"shift": [2, 4], "seed": [0, 1]}
    metric: str  # flat metric Optuna optimises, e.g. "auroc_mnist_bpd"
    mode: str = "max"
    num_samples: int | None = None  # default: size of the grid
    paper: dict[str, float] = field(default_factory=dict)  # reference values, for reports

    @property
    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.space.values())


def add_common_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("study (shared by every study file)")
    g.add_argument("--smoke", action="store_true", help="tiny subsets, 1 epoch: a few minutes on 2 CPU cores")
    g.add_argument("--resume", action="store_true", help="continue an interrupted study from its storage")
    g.add_argument("--storage", default="oodlab-results", help="results root (default ./oodlab-results)")
    g.add_argument("--name", help="study name (default: the study file's stem, + '-smoke' with --smoke)")
    g.add_argument("--num-samples", type=int, help="number of trials (default: the size of the grid)")
    g.add_argument("--sampler", choices=SAMPLERS, default="grid", help="Optuna sampler (default grid = the paper's grid)")
    g.add_argument("--seeds", type=int, default=1, help="seeds per configuration (an explicit grid dimension)")
    g.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster address (default: local Ray)")
    g.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial; fractions share a GPU")
    g.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial")
    g.add_argument("--max-concurrent", type=int, default=0, help="cap on trials running at once (0 = as resources allow)")
    g.add_argument("--max-failures", type=int, default=1,
                   help="retries of a trial whose worker died, from its last checkpoint (default 1)")
    g.add_argument("--checkpoint-storage", help="where Ray keeps experiment state and checkpoints: a shared "
                   "path (NFS) or s3://bucket/prefix so any node can resume any trial (default <storage>/ray)")
    g.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db)")
    g.add_argument("--epochs", type=int, help="training epochs per trial")
    g.add_argument("--train-n", type=int, help="use only this many ID training images")
    g.add_argument("--test-n", type=int, help="score only this many images of each test set")


SMOKE = {"epochs": 1, "train_n": 2000, "test_n": 500}


def common_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Fixed-config entries that come from the shared flags."""
    out = dict(SMOKE) if args.smoke else {}
    for key in ("epochs", "train_n", "test_n"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    return out


def validate(spec: StudySpec, args: argparse.Namespace) -> None:
    """Every check that can fail before Ray starts: configs, data files, flags."""
    if args.num_samples is not None and args.num_samples < 1:
        raise StudyError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.gpus_per_trial < 0 or args.cpus_per_trial <= 0:
        raise StudyError("--gpus-per-trial must be >= 0 and --cpus-per-trial > 0")
    if args.gpus_per_trial > 1 and not float(args.gpus_per_trial).is_integer():
        raise StudyError(f"--gpus-per-trial above 1 must be a whole number, got {args.gpus_per_trial}")
    if spec.mode not in ("min", "max"):
        raise StudyError(f"mode must be min or max, got {spec.mode!r}")
    if any(len(v) == 0 for v in spec.space.values()):
        raise StudyError(f"empty search dimension in {spec.space}")
    try:
        configs = [build_config({**spec.fixed, **dict(zip(spec.space, values))})
                   for values in itertools.product(*spec.space.values())]
    except ConfigError as e:
        raise StudyError(f"bad configuration: {e}") from None
    known = configs[0].metric_names()
    if spec.metric not in known:
        raise StudyError(f"target metric {spec.metric!r} is not reported; reported: {', '.join(known)}")
    sets: dict[tuple[str, str, bool], data.SetInfo] = {}
    try:  # load every set once: a missing file or a model that does not fit the data fails here
        for cfg in configs:
            for req in cfg.data_requests():
                if (*req, cfg.pad) not in sets:
                    sets[(*req, cfg.pad)] = data.load(*req, pad_to=32 if cfg.pad else None).info()
            cfg.check_data({req: sets[(*req, cfg.pad)] for req in cfg.data_requests()})
    except (data.DataError, ConfigError) as e:
        raise StudyError(str(e)) from None


@dataclass(frozen=True)
class CategoricalSpace:
    """Optuna define-by-run space over categorical dimensions; a class so OptunaSearch can pickle it."""

    space: dict[str, list]

    def __call__(self, trial) -> None:
        for key, values in self.space.items():
            trial.suggest_categorical(key, list(values))


def _sampler(name: str, space: dict[str, list], seed: int = 0):
    import optuna

    if name == "grid":
        return optuna.samplers.GridSampler({k: list(v) for k, v in space.items()}, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def known_optuna_trials(exp_dir: Path) -> set[int] | None:
    """Optuna trial numbers that Tune's saved searcher state tracks (None if none saved)."""
    import pickle

    states = sorted(exp_dir.glob("searcher-state-*.pkl"), key=lambda p: p.stat().st_mtime)
    if not states:
        return None
    with open(states[-1], "rb") as f:
        saved = pickle.load(f)
    return {t.number for t in saved.get("_ot_trials", {}).values()}


def reconcile_optuna(storage_url: str, study: str, keep: set[int] | None = None) -> int:
    """Mark RUNNING Optuna trials that Tune will never finish as FAIL; returns how many.

    A driver killed between Optuna's ``ask`` and Tune's state save leaves such orphans;
    left RUNNING they would also block their grid point. ``keep``: numbers Tune resumes.
    """
    import optuna

    try:
        s = optuna.load_study(study_name=study, storage=storage_url)
    except KeyError:
        return 0
    stale = [t for t in s.get_trials(deepcopy=False)
             if t.state == optuna.trial.TrialState.RUNNING and t.number not in (keep or set())]
    for t in stale:
        if "grid_id" in t.system_attrs:  # free its grid point: GridSampler counts FAIL as visited
            s._storage.set_trial_system_attr(t._trial_id, "grid_id", -1)
        s._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    return len(stale)


class StudyInterrupted(RuntimeError):
    """The study stopped early (Ctrl-C / SIGINT); its state is saved for ``--resume``."""


def _searcher_class():
    from ray.tune.search.optuna import OptunaSearch

    class Searcher(OptunaSearch):
        """OptunaSearch that records, on each Optuna trial, the Ray trial id and, for a failed
        trial, the reason (user attrs ``ray_trial_id``, ``error``); and that never tells Optuna
        twice: a driver killed after Optuna recorded a trial but before Tune saved its state
        sees that trial finish again on resume."""

        def _finished_in_optuna(self, trial_id) -> bool:
            ot = self._ot_trials.get(trial_id)
            return ot is not None and self._ot_study._storage.get_trial(ot._trial_id).state.is_finished()

        def on_trial_result(self, trial_id, result):
            if not self._finished_in_optuna(trial_id):
                super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id, result=None, error=False):
            if trial_id in self._completed_trials:
                return
            if self._finished_in_optuna(trial_id):
                self._completed_trials.add(trial_id)
                return
            ot = self._ot_trials.get(trial_id)
            if ot is not None:
                storage, tid = self._ot_study._storage, ot._trial_id
                storage.set_trial_user_attr(tid, "ray_trial_id", trial_id)
                reason = (result or {}).get("error") or ("trial errored (see MLflow tag oodlab.error)" if error else None)
                if reason:
                    storage.set_trial_user_attr(tid, "error", str(reason)[:2000])
            super().on_trial_complete(trial_id, result=result, error=error)

    return Searcher


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

    if not tune.Tuner.can_restore(exp_dir):
        raise StudyError(f"--resume: {exp_dir} holds no Ray Tune experiment state (tuner.pkl); "
                         "is it an oodlab study folder?")
    if _is_remote(exp_dir):
        return
    from oodlab.trainable import STATE_FILE

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
            print(f"[oodlab] warning: {errors[0]}; {trial.name} resumes from an older checkpoint", flush=True)


def run(spec: StudySpec, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run (or resume) the study; returns one row per trial: config values + target metric."""
    validate(spec, args)
    # Save Tune's experiment state every 2 s (Tune's default is ~10 s; 0 = every loop step costs
    # ~25% of a training epoch on 2 cores). A SIGKILL inside that window is handled by design:
    # the searcher never tells Optuna twice, and a restored trial resumes from its own newest
    # checkpoint (trainable.restore), so nothing is trained or counted twice.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    import optuna
    import ray
    from ray import tune

    from oodlab import tracking
    from oodlab.trainable import train

    results = Path(args.storage).resolve()
    ray_root = args.checkpoint_storage or str(results / "ray")
    exp_dir = f"{ray_root.rstrip('/')}/{spec.name}"
    if args.resume and not _exists(exp_dir):
        raise StudyError(f"--resume: no study {spec.name!r} under {ray_root}; run without --resume first")
    if not args.resume and _exists(exp_dir):
        raise StudyError(f"study {spec.name!r} already has results in {exp_dir}; pass --resume to continue it, "
                         "or choose another --name or --storage")
    _check_writable(results)
    if args.resume:
        _check_resumable(exp_dir)
    optuna_url = f"sqlite:///{results / 'optuna.db'}"
    mlflow_uri = args.mlflow_uri or tracking.tracking_uri(results)
    if not mlflow_uri.startswith("sqlite:"):
        try:
            tracking.check_reachable(mlflow_uri)
        except ConnectionError as e:
            raise StudyError(str(e)) from None

    target = ray_connect.init(args.address, num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True)
    print(f"[oodlab] Ray: {'joined ' + target.address if target.joins else 'local'} ({target.reason})", flush=True)
    try:
        hosts = ray_connect.node_hosts()
        if len(hosts) > 1 and not stores.is_shared(ray_root):
            raise StudyError(f"the Ray cluster spans {len(hosts)} machines but --checkpoint-storage {ray_root} is "
                             f"on a local disk ({stores.fs_type(ray_root)}): trials on other nodes could not save or "
                             "resume checkpoints; pass --checkpoint-storage s3://BUCKET/PREFIX or a shared (NFS) path")
        gpus = ray.cluster_resources().get("GPU", 0)
        if args.gpus_per_trial > 0 and gpus < args.gpus_per_trial:
            raise StudyError(f"--gpus-per-trial {args.gpus_per_trial} but the Ray cluster has {gpus:g} GPUs; "
                             "use --gpus-per-trial 0 on CPU-only machines")
        results.mkdir(parents=True, exist_ok=True)  # only now: a refused study writes nothing
        fixed = dict(spec.fixed)
        if args.gpus_per_trial == 0:
            fixed["device"] = "cpu"
        exp_id, parent = tracking.setup_study(mlflow_uri, results / "mlartifacts", spec.name,
                                              {"metric": spec.metric, **fixed})
        callback = tracking.MLflowCallback(mlflow_uri, exp_id, parent, spec.name, name_keys=tuple(spec.space))
        trainable = tune.with_resources(train, {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
        if args.resume:
            print(f"[oodlab] resuming {spec.name} from {exp_dir}", flush=True)
            keep = known_optuna_trials(Path(exp_dir)) if not _is_remote(exp_dir) else None
            orphans = reconcile_optuna(optuna_url, spec.name, keep=keep or set())
            if orphans:
                print(f"[oodlab] marked {orphans} orphaned Optuna trial(s) FAIL", flush=True)
            tuner = tune.Tuner.restore(exp_dir, trainable, resume_unfinished=True, resume_errored=True)
        else:
            n = args.num_samples or spec.num_samples or spec.grid_size
            ot_study = optuna.create_study(study_name=spec.name, storage=optuna_url, load_if_exists=True,
                                           direction="maximize" if spec.mode == "max" else "minimize")
            ot_study.set_user_attr("num_samples", n)  # read back on resume to tell "done" from "interrupted"
            searcher = _searcher_class()(space=CategoricalSpace(spec.space), metric=spec.metric, mode=spec.mode,
                                         sampler=_sampler(args.sampler, spec.space), study_name=spec.name,
                                         storage=optuna.storages.RDBStorage(optuna_url))
            print(f"[oodlab] study {spec.name}: {n} trials, space {spec.space}, target {spec.metric} ({spec.mode})",
                  flush=True)
            tuner = tune.Tuner(
                trainable,
                param_space=fixed,
                tune_config=tune.TuneConfig(search_alg=searcher, num_samples=n,
                                            max_concurrent_trials=args.max_concurrent or None,
                                            trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(
                    name=spec.name, storage_path=ray_root, callbacks=[callback],
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    failure_config=tune.FailureConfig(max_failures=args.max_failures), verbose=1,
                ),
            )
        t0 = time.time()
        grid = tuner.fit()
        rows = summarize(grid, spec)
        table = format_table(rows, spec)
        print(table, flush=True)
        n = optuna.load_study(study_name=spec.name, storage=optuna_url).user_attrs.get("num_samples", len(grid))
        if len(grid) < n or grid.num_terminated + grid.num_errors < len(grid):
            tracking.finish_study(mlflow_uri, parent, {}, {"trials.md": table}, status="KILLED")
            raise StudyInterrupted(f"study {spec.name} interrupted; its state is saved: rerun with --resume")
        stale = reconcile_optuna(optuna_url, spec.name)
        if stale:
            print(f"[oodlab] marked {stale} orphaned Optuna trial(s) FAIL", flush=True)
        finished = [r for r in rows if isinstance(r.get(spec.metric), float) and math.isfinite(r[spec.metric])]
        best = max(finished, key=lambda r: r[spec.metric] * (1 if spec.mode == "max" else -1), default=None)
        if best:
            print(f"[oodlab] best {spec.metric} = {best[spec.metric]:.4f} with "
                  + ", ".join(f"{k}={best[k]}" for k in spec.space), flush=True)
        tracking.finish_study(mlflow_uri, parent,
                              {"trials_finished": len(finished), "trials_failed": len(rows) - len(finished),
                               "wall_s": time.time() - t0, **({f"best_{spec.metric}": best[spec.metric]} if best else {})},
                              {"trials.md": table})
        print(f"[oodlab] results in {results}\n[oodlab] browse: mlflow ui --backend-store-uri {mlflow_uri}",
              flush=True)
        return rows
    finally:
        ray.shutdown()


def trial_dirname(trial) -> str:
    """Short trial folders (Tune's default embeds the whole config in the name)."""
    return f"trial_{trial.trial_id}"


def summarize(grid, spec: StudySpec) -> list[dict[str, Any]]:
    rows = []
    for r in grid:
        m = r.metrics or {}
        rows.append({"trial": m.get("trial_id", "?"), **{k: r.config.get(k) for k in spec.space},
                     "epoch": m.get("epoch"), spec.metric: m.get(spec.metric),
                     "status": "ERROR" if r.error else ("FAILED" if m.get("error") else ("OK" if m.get("done") else "STOPPED"))})
    return sorted(rows, key=lambda r: [str(r[k]) for k in spec.space])


def format_table(rows: list[dict[str, Any]], spec: StudySpec) -> str:
    if not rows:
        return "(no trials)"
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def parse_args(study_file: str, configure: Callable[[argparse.ArgumentParser], None],
               argv: list[str] | None = None, doc: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=Path(study_file).name, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(p)
    add_common_flags(p)
    return p.parse_args(argv)


def main(study_file: str, build: Callable[[argparse.Namespace], StudySpec],
         configure: Callable[[argparse.ArgumentParser], None], argv: list[str] | None = None) -> int:
    """Entry point of a study file: parse flags, build the spec, run; clear errors, exit 2."""
    args = parse_args(study_file, configure, argv, doc=getattr(sys.modules.get("__main__"), "__doc__", None))
    try:
        spec = build(args)
        run(spec, args)
    except (StudyError, ConfigError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StudyInterrupted as e:
        print(f"[oodlab] {e}", file=sys.stderr)
        return 130
    return 0


def default_name(study_file: str, args: argparse.Namespace) -> str:
    return args.name or Path(study_file).stem + ("-smoke" if args.smoke else "")
