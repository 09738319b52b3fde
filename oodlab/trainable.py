"""The Ray Tune function trainable: a thin wrapper around a trial's replicates (``oodlab.replicates``).

Every epoch it reports the loss terms and the (latest) metric table together with a
checkpoint holding the model, optimizer, epoch and RNG state, so a killed trial
continues from its last epoch. The final checkpoint also carries ``scores.npz`` and
``metrics.json``, which the driver-side MLflow callback turns into artifacts.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune

from oodlab.checkpoint import (
    ARTIFACTS_DIR,
    METRICS_FILE,
    REPLICAS_KEY,
    REPORT_FILE,
    SCORES_FILE,
    STATE_FILE,
    replica_dir,
    save_scores,
)
from oodlab.experiment import EpochResult
from oodlab.replicates import Replicates

__all__ = ["STATE_FILE", "newest_checkpoints", "restore", "train"]


def newest_checkpoints(ckpt: tune.Checkpoint) -> list[tune.Checkpoint]:
    """The trial's checkpoints, newest first, from the folder holding ``ckpt`` (any filesystem).

    Tune's saved experiment state can lag the trial's own checkpoints by a few seconds (it
    is saved every ``TUNE_GLOBAL_CHECKPOINT_S``); a driver killed in that window restores
    the trial with an older checkpoint than the trial wrote. Resuming from the newest one
    means no epoch is trained twice.
    """
    import pyarrow.fs

    parent = ckpt.path.rstrip("/").rsplit("/", 1)[0]
    fs = ckpt.filesystem or pyarrow.fs.LocalFileSystem()
    infos = fs.get_file_info(pyarrow.fs.FileSelector(parent))
    names = sorted((i.base_name for i in infos
                    if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_")), reverse=True)
    return [tune.Checkpoint(f"{parent}/{n}", filesystem=fs) for n in names] or [ckpt]


def restore(exp: Replicates, ckpt: tune.Checkpoint) -> tune.Checkpoint:
    """Load the newest readable checkpoint into ``exp``; returns it."""
    for c in newest_checkpoints(ckpt):
        with c.as_directory() as d:
            try:
                state = torch.load(Path(d) / STATE_FILE, map_location=exp.device, weights_only=True)
            except Exception:  # noqa: BLE001 - missing or written only in part before a kill: try an older one
                continue
        exp.load_state_dict(state)
        return c
    raise FileNotFoundError(f"no readable {STATE_FILE} in the checkpoints next to {ckpt.path}")


def _last_report(ckpt_dir: Path, exp: Replicates) -> dict[str, Any]:
    """What the trial reported with this checkpoint (checkpoints older than REPORT_FILE: the
    final metric table, if any)."""
    if (ckpt_dir / REPORT_FILE).exists():
        return json.loads((ckpt_dir / REPORT_FILE).read_text())
    if (ckpt_dir / METRICS_FILE).exists():
        return {"epoch": exp.epoch, "device": str(exp.device), **json.loads((ckpt_dir / METRICS_FILE).read_text())}
    return {}


def _write_final(folder: Path, res: EpochResult, exp: Replicates) -> None:
    """The final checkpoint's files: scores, metric table and method artifacts; with several seeds the
    trial's table is their mean and sd, and each seed's own files go to ``replica_dir(seed)``."""
    (folder / METRICS_FILE).write_text(json.dumps(res.metrics, indent=1, sort_keys=True))
    if not res.replicas:
        if res.scores is not None:
            save_scores(folder / SCORES_FILE, res.scores)
        (folder / ARTIFACTS_DIR).mkdir()
        exp.members[0].write_artifacts(folder / ARTIFACTS_DIR)
        return
    for (seed, r), member in zip(res.replicas.items(), exp.members):
        sub = folder / replica_dir(seed)
        (sub / ARTIFACTS_DIR).mkdir(parents=True)
        if r.scores is not None:
            save_scores(sub / SCORES_FILE, r.scores)
        (sub / METRICS_FILE).write_text(json.dumps(r.metrics, indent=1, sort_keys=True))
        member.write_artifacts(sub / ARTIFACTS_DIR)


def train(config: dict[str, Any]) -> None:
    exp = Replicates(config)
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        # Tune's saved state may predate the newest checkpoint's report (it is saved every few
        # seconds): replay that report first, so Tune, the scheduler (which ends a trial ASHA
        # stopped before the crash) and MLflow see where the trial stands. A finished trial
        # only replays its final report, with its checkpoint (scores for the artifacts).
        ckpt = restore(exp, ckpt)
        with ckpt.as_directory() as d:
            last = _last_report(Path(d), exp)
            if exp.done:
                tune.report({**last, "replayed": 1}, checkpoint=tune.Checkpoint.from_directory(d))
                return
            if last:
                tune.report({**last, "replayed": 1})
    start_epoch = exp.epoch  # > 0 when this run continues from a checkpoint (recorded in every report)
    # Until the first evaluation every metric reads NaN: the searcher needs its key in each report.
    nan_table = {k: float("nan") for k in exp.metric_names()}
    metrics = nan_table
    seed_metrics: dict[int, dict[str, float]] = {s: nan_table for s in exp.seeds}
    while not exp.done:
        try:
            res = exp.step()
        except FloatingPointError as e:  # diverged: end this trial as failed, not retried
            tune.report({"epoch": exp.epoch + 1, **nan_table, "error": str(e)})
            return
        metrics = res.metrics or metrics  # between evaluations, repeat the latest table
        report = {"epoch": res.epoch, "start_epoch": start_epoch, "epoch_s": res.seconds,
                  "device": str(exp.device), "replicates": exp.mode, **res.train, **metrics}
        if res.replicas:
            seed_metrics = {s: r.metrics or seed_metrics[s] for s, r in res.replicas.items()}
            report[REPLICAS_KEY] = {str(s): {**r.train, **seed_metrics[s]} for s, r in res.replicas.items()}
        with tempfile.TemporaryDirectory() as d:
            torch.save(exp.state_dict(), Path(d) / STATE_FILE)
            if exp.done:
                _write_final(Path(d), res, exp)
            (Path(d) / REPORT_FILE).write_text(json.dumps(report, allow_nan=True))
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))
