"""The trial checkpoint format, shared by the trainable (writes it) and tracking (reads it).

A checkpoint folder holds ``STATE_FILE`` (model, optimizer, epoch and RNG state) and
``REPORT_FILE`` (what the trial reported to Tune with it, replayed when a restored trial
resumes, so Tune's scheduler and callbacks see where it stands before it trains on); the
final one also holds ``SCORES_FILE`` (raw scores), ``METRICS_FILE`` (the metric table)
and ``ARTIFACTS_DIR`` (method-specific files, logged to MLflow as they are). A trial of several
seeds (``oodlab.replicates``) writes the mean-and-sd table as ``METRICS_FILE`` and each seed's own
scores, table and artifacts under ``replica_dir(seed)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

STATE_FILE = "state.pt"
REPORT_FILE = "report.json"
SCORES_FILE = "scores.npz"
METRICS_FILE = "metrics.json"
ARTIFACTS_DIR = "artifacts"
REPLICAS_DIR = "replicas"  # a trial of several seeds: replicas/seed_<s>/ holds each seed's final files
REPLICAS_KEY = "replicas"  # key of the per-seed results in a trial's report: {seed: {metric: value}}


def replica_dir(seed: int) -> str:
    return f"{REPLICAS_DIR}/seed_{seed}"


def save_scores(path: Path, scores: dict[str, dict[str, np.ndarray]]) -> None:
    """Flatten {set: {score: array}} into one npz with keys ``set/score``."""
    flat: dict[str, Any] = {f"{s}/{k}": v for s, d in scores.items() for k, v in d.items()}
    np.savez_compressed(path, **flat)


def load_scores(path: Path) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as z:
        for key in z.files:
            s, k = key.split("/", 1)
            out.setdefault(s, {})[k] = z[key]
    return out
