"""``oodlab export STUDY DIR``: copy one study out of its stores into a folder another machine opens.

Why: on a cluster the stores die with the head (sqlite on its disk) or live in a database the
laptop cannot reach. The export is self-contained and relocatable:

    DIR/optuna.db      the study's Optuna trials (``optuna.copy_study``)
    DIR/mlflow.db      the study's MLflow experiment: every run with params, tags, status, times
                       and full metric histories (parent/child links remapped to the new run ids)
    DIR/mlartifacts/   the runs' artifacts, addressed as ``mlflow-artifacts:/`` (served by
                       ``oodlab ui --storage DIR``, which passes ``--artifacts-destination DIR/mlartifacts``)

so ``oodlab list/report/ui --storage DIR`` work wherever DIR is copied to.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oodlab import stores, tags

log = logging.getLogger(__name__)
BATCH = 1000  # MLflow's log_batch limit on metrics per call


@dataclass(frozen=True)
class Exported:
    optuna_trials: int
    mlflow_runs: int
    artifact_files: int


class ExportError(ValueError):
    """The study is not in the given stores, or DIR already holds it."""


def artifact_folder(study: str) -> str:
    """The experiment's folder under DIR/mlartifacts (a safe name, stable for one study)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", study)


def export_study(study: str, out: Path, optuna_url: str, mlflow_uri: str) -> Exported:
    """Copy ``study`` from the given stores into ``out`` (created); refuses to overwrite it."""
    import optuna
    from mlflow.tracking import MlflowClient

    src = MlflowClient(tracking_uri=mlflow_uri)
    exp = src.get_experiment_by_name(study)
    if exp is None:
        raise ExportError(f"no MLflow experiment {study!r} in {stores.redact(mlflow_uri)}")
    ot_src = stores.optuna_storage(optuna_url)
    if not stores.study_exists(ot_src, study):
        raise ExportError(f"no Optuna study {study!r} in {stores.redact(optuna_url)}")
    out = out.resolve()
    if (out / "optuna.db").exists() and stores.study_exists(stores.optuna_storage(stores.default_optuna_url(out)),
                                                            study):
        raise ExportError(f"{out} already holds study {study!r}; export into another folder")
    out.mkdir(parents=True, exist_ok=True)
    optuna.copy_study(from_study_name=study, from_storage=ot_src, to_storage=stores.default_optuna_url(out))
    n_trials = len(optuna.load_study(study_name=study, storage=stores.default_optuna_url(out)).trials)

    dst = MlflowClient(tracking_uri=stores.default_mlflow_uri(out))
    folder = artifact_folder(study)
    exp_id = dst.create_experiment(study, artifact_location=f"mlflow-artifacts:/{folder}",
                                   tags={k: v for k, v in exp.tags.items() if not k.startswith("mlflow.")})
    runs = src.search_runs([exp.experiment_id], max_results=50_000)
    by_id = {r.info.run_id: r for r in runs}
    runs.sort(key=lambda r: _depth(r, by_id))  # parents first: children need their new id
    new_id: dict[str, str] = {}
    files = 0
    for run in runs:
        new_id[run.info.run_id] = rid = _copy_run(src, dst, exp_id, run, new_id)
        files += _copy_artifacts(src, run.info.run_id, out / "mlartifacts" / folder / rid / "artifacts")
    log.info("exported %s: %d Optuna trials, %d MLflow runs, %d artifact files into %s",
             study, n_trials, len(runs), files, out)
    return Exported(n_trials, len(runs), files)


def _depth(run: Any, by_id: dict[str, Any]) -> int:
    """How deep ``run`` nests (study parent 0, trial 1, a trial's seed run 2)."""
    depth, seen = 0, {run.info.run_id}
    while (up := run.data.tags.get(tags.PARENT)) in by_id and up not in seen:
        run, depth = by_id[up], depth + 1
        seen.add(up)
    return depth


def _copy_run(src: Any, dst: Any, exp_id: str, run: Any, new_id: dict[str, str]) -> str:
    from mlflow.entities import Metric, Param

    run_tags = dict(run.data.tags)
    if tags.PARENT in run_tags:
        run_tags[tags.PARENT] = new_id.get(run_tags[tags.PARENT], run_tags[tags.PARENT])
    run_tags[tags.EXPORTED_FROM] = run.info.run_id
    rid = dst.create_run(exp_id, start_time=run.info.start_time, tags=run_tags,
                         run_name=run.info.run_name).info.run_id
    params = [Param(k, v) for k, v in run.data.params.items()]
    for i in range(0, len(params), 100):
        dst.log_batch(rid, params=params[i:i + 100])
    metrics = [Metric(m.key, m.value, m.timestamp, m.step)
               for key in run.data.metrics for m in src.get_metric_history(run.info.run_id, key)]
    for i in range(0, len(metrics), BATCH):
        dst.log_batch(rid, metrics=metrics[i:i + BATCH])
    if run.info.status in ("FINISHED", "FAILED", "KILLED"):
        dst.set_terminated(rid, status=run.info.status, end_time=run.info.end_time)
    else:  # exported while it runs: keep what it is
        dst.update_run(rid, status=run.info.status)
    return str(rid)


def _copy_artifacts(src: Any, run_id: str, dest: Path) -> int:
    if not src.list_artifacts(run_id):
        return 0
    with tempfile.TemporaryDirectory() as d:
        local = Path(src.download_artifacts(run_id, "", d))
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copytree(local, dest, dirs_exist_ok=True)
    return sum(1 for p in dest.rglob("*") if p.is_file())
