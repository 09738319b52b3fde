"""A study's finished trials as configurations with replicates: the one reader of MLflow results.

``oodlab report``, the selection and the seed table read a study through ``read``: every
finished replicate (one seed's final metric table) grouped by configuration, i.e. by its
params without the fields that are not hyperparameters (``naming.NOT_HYPERPARAMETERS``).
A replicate is the nested seed run of a trial of several seeds, or the trial run itself
when the trial has one seed (also every trial of studies made when seeds were a searched
parameter, which therefore still group and report the same way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from oodlab import tags
from oodlab.naming import NOT_HYPERPARAMETERS

Table = dict[str, float]


@dataclass
class Configuration:
    """The finished replicates (seeds) of one configuration."""

    config: tuple[tuple[str, str], ...]  # (param, value) pairs, hyperparameters only, sorted by name
    params: dict[str, str]  # every param of its first trial (id, ood, … for table rows)
    metrics: list[Table] = field(default_factory=list)  # one final metric table per replicate

    def values(self, name: str) -> list[float]:
        return [float(m[name]) for m in self.metrics if name in m and math.isfinite(float(m[name]))]

    def mean(self, name: str) -> float:
        v = self.values(name)
        return float(np.mean(v)) if v else math.nan

    def sd(self, name: str) -> float:
        """Sample sd over replicates (NaN with one)."""
        v = self.values(name)
        return float(np.std(v, ddof=1)) if len(v) > 1 else math.nan


@dataclass
class StudyRuns:
    """What ``read`` found of one study."""

    study: str
    parent: Any  # the parent MLflow run (params: target ``metric``/``mode``, fixed config), or None
    replicates: list[tuple[dict[str, str], Table]]  # (params, final metrics) of every finished replicate
    stopped: list[bool]  # per replicate: its trial was stopped early (ASHA)

    @property
    def parent_id(self) -> str | None:
        return self.parent.info.run_id if self.parent is not None else None

    def configurations(self) -> list[Configuration]:
        return group(self.replicates)

    def completed(self) -> StudyRuns:
        """Only the replicates of trials that ran to the end: a stopped trial's metrics are of an earlier epoch."""
        kept = [r for r, stop in zip(self.replicates, self.stopped) if not stop]
        return StudyRuns(self.study, self.parent, kept, [False] * len(kept))


def group(replicates: list[tuple[dict[str, str], Table]]) -> list[Configuration]:
    """Replicates grouped by configuration: every param except those that are not hyperparameters."""
    keys = sorted({k for p, _ in replicates for k in p} - NOT_HYPERPARAMETERS)
    groups: dict[tuple[tuple[str, str], ...], Configuration] = {}
    for params, metrics in replicates:
        cfg = tuple((k, params.get(k, "")) for k in keys)
        groups.setdefault(cfg, Configuration(cfg, dict(params))).metrics.append(metrics)
    return list(groups.values())


def read(client: Any, study: str) -> StudyRuns:
    """Every finished replicate of a study in an MLflow store (``StudyRuns.completed``: without the
    trials a scheduler stopped early). ValueError for an unknown study."""
    exp = client.get_experiment_by_name(study)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no study {study!r} in the MLflow store; known: {', '.join(known) or 'none'}")
    runs = client.search_runs([exp.experiment_id], max_results=50_000)
    role = {r.info.run_id: r.data.tags.get(tags.ROLE) for r in runs}
    trials = [r for r in runs if role[r.info.run_id] == "trial" and r.info.status == "FINISHED"]
    seeds_of: dict[str, list[Any]] = {}
    for r in runs:
        if role[r.info.run_id] == "seed" and r.info.status == "FINISHED":
            seeds_of.setdefault(r.data.tags.get(tags.PARENT, ""), []).append(r)
    replicates, stopped = [], []
    for t in trials:
        for r in seeds_of.get(t.info.run_id) or [t]:
            replicates.append((dict(r.data.params), dict(r.data.metrics)))
            stopped.append(t.data.tags.get(tags.STOPPED_EARLY) == "true")
    parents = [r for r in runs if role[r.info.run_id] == "parent"]
    return StudyRuns(study, parents[0] if parents else None, replicates, stopped)
