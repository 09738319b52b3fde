"""A trial is one configuration with N replicates: seeds ``seed … seed+N−1`` trained in one process.

Seeds are replicates, not hyperparameters: the search never sees them, and what it sees of a
trial is the mean over its seeds (``{name}``) with their standard deviation (``{name}_sd``),
so a selection is never made on one lucky seed. Each replicate is the method's own
``Experiment`` built with its seed (its own initialisation, data order and draws). They train
fused as one batched model where the method offers it (``Experiment.fuse``, see
``oodlab.fusion``) and the device favours it, otherwise one after another in this process,
which still saves N−1 process starts, data loads and Tune round trips.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Protocol

import numpy as np
import torch

from oodlab.experiment import EpochResult, Experiment, TrialConfig, shared_sets
from oodlab.naming import SD
from oodlab.registry import build, build_config

log = logging.getLogger(__name__)


class Fused(Protocol):
    """What a method's ``Experiment.fuse(members)`` returns: trains every member's epoch at once."""

    def train_epoch(self) -> list[dict[str, float]]:
        """One epoch of every member (they stay where they are until ``sync_out``); mean loss parts each."""

    def sync_out(self) -> None:
        """Write the fused weights and optimizer state into the members."""

    def sync_in(self) -> None:
        """Read the members' weights and optimizer states (after a checkpoint was loaded)."""


def mean_and_sd(tables: list[dict[str, float]]) -> dict[str, float]:
    """Each key's mean over the tables and, for two or more, its sample sd as ``{key}_sd``."""
    out: dict[str, float] = {}
    for k in tables[0]:
        v = np.array([t.get(k, math.nan) for t in tables], dtype=float)
        out[k] = float(v.mean())
        if len(v) > 1:
            out[k + SD] = float(v.std(ddof=1))
    return out


def sd_names(names: list[str]) -> list[str]:
    return [n + SD for n in names]


def fuse_mode(cfg: TrialConfig, device: torch.device) -> str:
    """"fused" or "looped": the config's choice, or for "auto" what measured faster on that device kind:
    looped on a CPU (benchmarks/replicates.py: vmap over paper 000's VAE is no faster on 2 cores),
    fused on a GPU, where a small model's steps are bound by kernel launches."""
    if cfg.fuse != "auto":
        return cfg.fuse
    return "fused" if device.type == "cuda" else "looped"


class Replicates:
    """The N replicates of one trial; the trainable's view of a trial (epoch, step, checkpoint state)."""

    def __init__(self, config: dict[str, Any] | TrialConfig) -> None:
        self.cfg = build_config(config)
        self.seeds = [self.cfg.seed + i for i in range(self.cfg.seeds)]
        with shared_sets():  # one copy of the data for every replicate
            self.members: list[Experiment[Any]] = [
                build(dataclasses.replace(self.cfg, seed=s, seeds=1)) for s in self.seeds]
        self.device = self.members[0].device
        self.fused = self._fuse()

    def _fuse(self) -> Fused | None:
        if len(self.members) == 1 or fuse_mode(self.cfg, self.device) == "looped":
            return None
        hook = getattr(self.members[0], "fuse", None)
        fused: Fused | None = hook(self.members) if hook is not None else None
        if fused is None:
            log.info("%s replicates of this configuration cannot train fused; they train one after another",
                     self.cfg.method)
        return fused

    @property
    def mode(self) -> str:
        """How the replicates train: "single", "fused" or "looped"."""
        return "single" if len(self.members) == 1 else "fused" if self.fused is not None else "looped"

    @property
    def epoch(self) -> int:
        return self.members[0].epoch

    @property
    def done(self) -> bool:
        return self.members[0].done

    def metric_names(self) -> list[str]:
        names = self.cfg.metric_names()
        return names if len(self.members) == 1 else names + sd_names(names)

    def step(self) -> EpochResult:
        """Train every replicate one epoch (evaluating when due); the result holds the means and sds,
        and each seed's own result in ``replicas``."""
        if len(self.members) == 1:
            return self.members[0].step()
        t0 = time.perf_counter()
        if self.fused is not None:
            self.members[0].check_fault()
            trains = self.fused.train_epoch()
            self.fused.sync_out()
            results = [m.close_epoch(tr, t0) for m, tr in zip(self.members, trains)]
        else:
            results = [m.step() for m in self.members]
        metrics = mean_and_sd([r.metrics for r in results]) if results[0].metrics else {}
        train = {k: float(np.mean([r.train[k] for r in results])) for k in results[0].train}
        return EpochResult(results[0].epoch, train, metrics, None, time.perf_counter() - t0,
                           replicas=dict(zip(self.seeds, results)))

    def state_dict(self) -> dict[str, Any]:
        """One replicate: its own state (the single-seed checkpoint format); several: a list of them."""
        if len(self.members) == 1:
            return self.members[0].state_dict()
        return {"replicas": [m.state_dict() for m in self.members], "seeds": self.seeds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = state["replicas"] if "replicas" in state else [state]
        if len(states) != len(self.members):
            raise ValueError(f"the checkpoint holds {len(states)} replicate(s), the trial has {len(self.members)}")
        for m, s in zip(self.members, states):
            m.load_state_dict(s)
        if self.fused is not None:
            self.fused.sync_in()
