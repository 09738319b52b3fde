"""MLflow tracking, done on the driver: one parent run per study, one child run per trial.

Workers never talk to MLflow; a Tune callback on the driver logs for them, keyed by the
Ray trial id (tag ``ray_trial_id``). A trial of several seeds logs the mean and sd of each
metric on its run and each seed's metrics, ROC curves, histograms and scores on a nested
run (tags ``oodlab.role=seed``, ``oodlab.seed``, ``oodlab.replica_of``). On resume the callback finds a trial's existing
run by that tag and continues it, and skips metric steps already logged, so a resumed
study never duplicates a run or a point.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import tune

from oodlab import plots, tags
from oodlab.checkpoint import ARTIFACTS_DIR, METRICS_FILE, REPLICAS_KEY, SCORES_FILE, load_scores, replica_dir

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient
    from ray.tune.experiment import Trial

EXPERIMENT_KIND = "mlflow.experimentKind"  # MLflow 3 UI: which view an experiment opens on
_RAY_KEYS = {"timestamp", "pid", "done", "training_iteration", "time_since_restore", "iterations_since_restore",
             "time_this_iter_s", "epoch"}


def _client(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str) -> None:
    """Fail fast (before any compute) when the tracking store cannot be reached."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})
    try:
        _client(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot use this store"
        raise ConnectionError(f"cannot reach the MLflow tracking store at {uri}: {type(e).__name__}: {e}") from None
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def setup_study(uri: str, artifacts: Path, study: str, params: dict[str, Any]) -> tuple[str, str]:
    """Create (or find) the experiment and the study's parent run, once, before any trial.

    Creating the sqlite database here, in one process, avoids the migration race two
    trials hit when they create it at once. Returns (experiment_id, parent_run_id).
    """
    client = _client(uri)
    exp = client.get_experiment_by_name(study)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        study, artifact_location=None if uri.startswith(("http:", "https:")) else artifacts.resolve().as_uri())
    runs = client.search_runs([exp_id], f"tags.`{tags.ROLE}` = 'parent'", max_results=1)
    if runs:
        run_id = runs[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(exp_id, run_name=study, tags={tags.STUDY: study, tags.ROLE: "parent"}).info.run_id
        for k, v in params.items():
            client.log_param(run_id, k, v)
    return exp_id, run_id


def tag_study(uri: str, experiment_id: str, parent_run_id: str, run_tags: dict[str, str]) -> None:
    """Tags of the parent run (target, sampler, …), and the experiment kind that makes MLflow 3's
    UI open the study on its runs table ("model training") instead of the GenAI overview."""
    from mlflow.entities import RunTag

    client = _client(uri)
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, "custom_model_development")
    client.log_batch(parent_run_id, tags=[RunTag(k, v) for k, v in run_tags.items()])


def reconcile_runs(uri: str, experiment_id: str, keep: set[str]) -> int:
    """Close the trial runs (and their seed runs) of trials Tune will never finish: KILLED and tagged
    ``oodlab.orphaned``; returns how many trials. A driver killed after a trial's first report but
    before Tune saved its state leaves such a run; the resumed study asks for a new trial instead.
    ``keep``: the Ray trial ids of the finished study."""
    client = _client(uri)
    runs = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=50_000)
    lost = {r.data.tags.get(tags.TRIAL) for r in runs if r.data.tags.get(tags.ROLE) == "trial"} - keep - {None}
    for r in runs:
        if r.data.tags.get(tags.TRIAL) in lost or r.data.tags.get(tags.REPLICA_OF) in lost:
            client.set_tag(r.info.run_id, tags.ORPHANED, "true")
            client.set_terminated(r.info.run_id, status="KILLED")
    return len(lost)


def finish_study(uri: str, parent_run_id: str, summary: dict[str, Any], files: dict[str, str],
                 status: str = "FINISHED", figures: Sequence[Path] = ()) -> None:
    """Log the study's summary metrics, text files and figures to the parent run and close it."""
    from mlflow.entities import Metric

    client = _client(uri)
    now = int(time.time() * 1000)
    client.log_batch(parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in summary.items()])
    with tempfile.TemporaryDirectory() as d:
        for name, text in files.items():
            (Path(d) / name).write_text(text)
            client.log_artifact(parent_run_id, str(Path(d) / name))
    for f in figures:
        client.log_artifact(parent_run_id, str(f), artifact_path="search")
    client.set_terminated(parent_run_id, status)


def browse_hint(results: Path, uri: str, experiment_id: str) -> str:
    """One line that lands on the study's runs table."""
    if uri.startswith("sqlite:"):
        return (f"oodlab ui --storage {results}  then open "
                f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs")
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs"


def numeric(result: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in result.items()
            if k not in _RAY_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}


class MLflowCallback(tune.Callback):
    """Logs each Tune trial to its own MLflow child run. Picklable: the client is made lazily."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, study: str, name_keys: tuple[str, ...] = (),
                 max_epoch: int | None = None) -> None:
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.study, self.name_keys, self.max_epoch = study, name_keys, max_epoch
        self._client: MlflowClient | None = None
        self._runs: dict[str, str] = {}  # ray trial id -> mlflow run id
        self._last_step: dict[str, int] = {}  # ray trial id -> last epoch logged

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_runs": {}, "_last_step": {}}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = _client(self.uri)
        return self._client

    def _run_for(self, trial: Trial) -> str:
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        found = self.client.search_runs([self.experiment_id], f"tags.`{tags.TRIAL}` = '{tid}'", max_results=1)
        if found:  # resumed trial: continue its run, after the last logged epoch
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            hist = self.client.get_metric_history(run_id, "loss")
            self._last_step[tid] = max((m.step for m in hist), default=0)
        else:
            name = " ".join(f"{k}={trial.config.get(k)}" for k in self.name_keys) or tid
            run_tags = {tags.TRIAL: tid, tags.STUDY: self.study, tags.ROLE: "trial", tags.PARENT: self.parent_run_id}
            run_id = self.client.create_run(self.experiment_id, run_name=f"{name} [{tid}]", tags=run_tags).info.run_id
            from mlflow.entities import Param

            params = [Param(k, str(v)) for k, v in sorted(trial.config.items())]
            self.client.log_batch(run_id, params=params)
            self._last_step[tid] = 0
        self._runs[tid] = run_id
        return run_id

    def _seed_run(self, trial: Trial, seed: str) -> str:
        """The nested run of one seed of a trial of several seeds (found again on resume)."""
        key = f"{trial.trial_id}/{seed}"
        if key in self._runs:
            return self._runs[key]
        parent = self._run_for(trial)
        found = self.client.search_runs([self.experiment_id], f"tags.`{tags.REPLICA_OF}` = '{trial.trial_id}' and "
                                        f"tags.`{tags.SEED}` = '{seed}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            hist = self.client.get_metric_history(run_id, "loss")
            self._last_step[key] = max((m.step for m in hist), default=0)
        else:
            from mlflow.entities import Param

            run_tags = {tags.REPLICA_OF: trial.trial_id, tags.SEED: seed, tags.STUDY: self.study, tags.ROLE: "seed",
                        tags.PARENT: parent}
            run_id = self.client.create_run(self.experiment_id, run_name=f"seed={seed} [{trial.trial_id}]",
                                            tags=run_tags).info.run_id
            params = {**{k: str(v) for k, v in trial.config.items()}, "seed": seed, "seeds": "1"}
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in sorted(params.items())])
            self._last_step[key] = 0
        self._runs[key] = run_id
        return run_id

    def _seeds(self, trial: Trial) -> list[str]:
        """The seeds of a trial of several seeds ([] for one seed: its trial run is the seed's run)."""
        seeds = int(trial.config.get("seeds", 1) or 1)
        first = int(trial.config.get("seed", 0) or 0)
        return [str(first + i) for i in range(seeds)] if seeds > 1 else []

    def _log_seeds(self, trial: Trial, result: dict[str, Any], step: int, now: int) -> None:
        from mlflow.entities import Metric

        for seed, values in (result.get(REPLICAS_KEY) or {}).items():
            run_id = self._seed_run(trial, seed)
            key = f"{trial.trial_id}/{seed}"
            if step <= self._last_step.get(key, 0):
                continue
            self.client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in numeric(values).items()])
            self._last_step[key] = step

    def _end_seeds(self, trial: Trial, status: str, ckpt: Path | None = None) -> None:
        for seed in self._seeds(trial):
            run_id = self._seed_run(trial, seed)
            if ckpt is not None:
                self._log_artifacts(run_id, ckpt / replica_dir(int(seed)))
            self.client.set_terminated(run_id, status)

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._run_for(trial)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any],
                        **info: Any) -> None:
        from mlflow.entities import Metric, RunTag

        run_id = self._run_for(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        self._log_seeds(trial, result, step, now)
        if step <= self._last_step.get(trial.trial_id, 0):
            return  # already logged before a crash
        device = [RunTag(tags.DEVICE, str(result["device"]))] if "device" in result and step == 1 else []
        metrics = [Metric(k, v, now, step) for k, v in numeric(result).items()]
        self.client.log_batch(run_id, metrics=metrics, tags=device)
        self._last_step[trial.trial_id] = step

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        run_id = self._run_for(trial)
        error = (trial.last_result or {}).get("error")
        if error:  # the trainable ended the trial itself (e.g. the loss diverged)
            self.client.set_tag(run_id, tags.ERROR, str(error)[:5000])
            self.client.set_terminated(run_id, "FAILED")
            self._end_seeds(trial, "FAILED")
            return
        epoch = (trial.last_result or {}).get("epoch")
        if self.max_epoch and epoch and epoch < self.max_epoch:  # the scheduler stopped it: say so, keep its metrics
            self.client.set_tag(run_id, tags.STOPPED_EARLY, "true")
            self.client.set_tag(run_id, tags.STOPPED_AT_EPOCH, str(epoch))
            self._end_seeds(trial, "FINISHED")
        elif trial.checkpoint is not None:
            with trial.checkpoint.as_directory() as d:
                self._log_artifacts(run_id, Path(d))
                self._end_seeds(trial, "FINISHED", Path(d))
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        run_id = self._run_for(trial)
        err = trial.get_error()
        if err is not None:
            self.client.set_tag(run_id, tags.ERROR, str(err)[-5000:])
        self.client.set_terminated(run_id, "FAILED")
        self._end_seeds(trial, "FAILED")

    def _log_artifacts(self, run_id: str, ckpt: Path) -> None:
        if not (ckpt / SCORES_FILE).exists():  # a trial of several seeds: its seed runs get the figures
            if (ckpt / METRICS_FILE).exists():
                self.client.log_artifact(run_id, str(ckpt / METRICS_FILE))
            return
        scores = load_scores(ckpt / SCORES_FILE)
        with tempfile.TemporaryDirectory() as d:
            out = Path(d)
            plots.roc_figure(scores, out / "roc.png")
            plots.histogram_figure(scores, out / "scores_hist.png")
            for f in (out / "roc.png", out / "scores_hist.png", ckpt / SCORES_FILE, ckpt / METRICS_FILE):
                self.client.log_artifact(run_id, str(f))
        extra = ckpt / ARTIFACTS_DIR
        if extra.is_dir() and any(extra.iterdir()):
            self.client.log_artifacts(run_id, str(extra))
        table = json.loads((ckpt / METRICS_FILE).read_text())
        self.client.set_tag(run_id, tags.METRICS, json.dumps({k: round(v, 4) for k, v in table.items()
                                                             if k.startswith(("auroc", "val_auroc"))}))
