"""The method contract: one trial, pure: config -> data -> model -> epochs of training -> OOD evaluation.

This is the science end of the pipeline; it knows nothing of Ray, Optuna or MLflow, nor of
the methods themselves. Each method (``oodlab.methods.<name>``) defines a ``Config`` (a
frozen dataclass subclassing ``TrialConfig``) and an ``Experiment`` (subclassing the
abstract ``Experiment[Config]`` here) that holds everything a checkpoint needs.
``oodlab.registry`` maps the config's ``method`` key to that pair (this module never
imports it, so there is no import cycle); ``registry.run_trial`` is the bare loop that
benchmarks and tests call, and ``oodlab.trainable`` wraps the same object for Ray Tune.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from oodlab import data
from oodlab.metrics import METRICS, ood_metrics

Scores = dict[str, dict[str, np.ndarray]]  # {"id" | ood_key: {score_name: (N,) array}}
SetInfos = dict[tuple[str, str], data.SetInfo]  # (spec, split) -> size, (C, H, W) and labels as loaded


_T = TypeVar("_T", bound="TrialConfig")


class ConfigError(ValueError):
    """A trial configuration that cannot run; raised before any compute."""


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise ConfigError with the message of the first failed ``(ok, message)`` pair."""
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


@dataclass(frozen=True)
class TrialConfig:
    """Fields every method shares: data, optimisation, evaluation. Methods subclass it."""

    method: str = "negprior"  # which method runs the trial: a key of oodlab.registry.METHODS
    # --- data ---
    id: str = "fashion_mnist"  # in-distribution set (train split for training, test split for scoring)
    ood: tuple[str, ...] = ("mnist",)  # OOD test sets, each scored and reported on its own
    train_n: int | None = None  # use only this many ID training images (None = all)
    test_n: int | None = None  # score only this many images of each test set (None = all)
    pad: bool = False  # zero-pad 28×28 to 32×32, as paper 000 does
    # --- optimisation ---
    epochs: int = 100
    batch_size: int = 50
    lr: float = 1e-4
    seed: int = 0
    # --- evaluation ---
    eval_every: int = 1  # evaluate every k epochs and after the last
    eval_batch_size: int = 1000
    device: str = "auto"  # "auto" = cuda if visible, else cpu
    fail_at_epoch: int | None = None  # fault injection (tests): the loss "diverges" at this epoch

    def __post_init__(self) -> None:
        raw: str | tuple[str, ...] = self.ood  # a comma-separated string from the command line or MLflow
        ood = data.split_specs(raw) if isinstance(raw, str) else list(raw)
        object.__setattr__(self, "ood", tuple(ood))
        require([
            (len(self.ood) > 0, "ood: give at least one OOD set"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (0 < self.lr < 1, f"lr must be in (0, 1), got {self.lr}"),
            (self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (self.train_n is None or self.train_n >= 1, f"train_n must be >= 1, got {self.train_n}"),
            (self.test_n is None or self.test_n >= 1, f"test_n must be >= 1, got {self.test_n}"),
            (self.device in ("auto", "cpu") or self.device.startswith("cuda"),
             f"device must be auto, cpu or cuda[:k]; got {self.device!r}"),
        ])
        for spec, _ in self.data_requests():
            try:
                data.validate(spec)
            except data.DataError as e:
                raise ConfigError(str(e)) from None
        keys = [set_key(s) for s in self.ood]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"OOD sets must have distinct names, got {keys}")

    def data_requests(self) -> list[tuple[str, str]]:
        """(spec, split) of every set the trial loads; the runner loads each once up front."""
        return [(self.id, "train"), (self.id, "test"), *[(o, "test") for o in self.ood]]

    def metric_names(self) -> list[str]:
        """Every flat metric the trial reports at an evaluation."""
        return [metric_name(m, o, s) for o in self.ood for s in self.score_names() for m in METRICS]

    def check_data(self, sets: SetInfos) -> None:
        """Check the method fits the data before any compute; ``sets``: (spec, split) -> SetInfo of
        every set in ``data_requests()`` as loaded (after padding). Raise ConfigError. The runner
        calls it for every config before Ray starts; methods extend it with their model's checks."""
        train = sets[(self.id, "train")].shape
        for spec in (self.id, *self.ood):
            same_shape(spec, sets[(spec, "test")].shape, train)

    def score_names(self) -> tuple[str, ...]:
        """Names of the scores the method reports (higher = more OOD)."""
        return ()

    @classmethod
    def from_dict(cls: type[_T], d: dict[str, Any]) -> _T:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown} for method {cls.__module__.rsplit('.', 1)[-1]}; "
                              f"known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ood"] = ",".join(self.ood)
        return d


def set_key(spec: str) -> str:
    """A short metric-safe name for a data spec: ``npz:/a/b/x.npz`` -> ``x``, ``mnist[n=5]`` -> ``mnist_n_5``."""
    if spec.startswith("npz:"):
        path, _, mods = spec[4:].partition("[")
        spec = path.rsplit("/", 1)[-1].removesuffix(".npz") + ("[" + mods if mods else "")
    return re.sub(r"[^0-9a-zA-Z]+", "_", spec).strip("_").lower()


def metric_name(metric: str, ood: str, score: str) -> str:
    """Flat name of one number of the metric table, e.g. ``auroc_mnist_bpd``."""
    return f"{metric}_{set_key(ood)}_{score}"


def metric_table(scores: Scores, oods: tuple[str, ...]) -> dict[str, float]:
    """Flat table ``{metric}_{ood}_{score}`` of ID-test vs each OOD set, for every score."""
    table = {}
    for spec in oods:
        for score_name, s_out in scores[set_key(spec)].items():
            for m, v in ood_metrics(scores["id"][score_name], s_out).items():
                table[metric_name(m, spec, score_name)] = v
    return table


def same_shape(name: str, shape: tuple[int, ...], id_shape: tuple[int, ...]) -> None:
    """ConfigError unless a set's (C, H, W) equals the ID set's."""
    if tuple(shape) != tuple(id_shape):
        raise ConfigError(f"set {name!r} has images of shape {tuple(shape)} but the ID set has {tuple(id_shape)}; "
                          "make them match with modifiers such as [channels=3,size=32]")


def labels_of(spec: str, info: data.SetInfo, method: str) -> tuple[int, ...]:
    """The ID set's classes; ConfigError for a set without labels that ``method`` needs."""
    if not info.classes:
        raise ConfigError(f"ID set {spec!r} has no labels; {method} needs them")
    return info.classes


def auto_arch(arch: str, channels: int) -> str:
    """``arch`` unless it is "auto": then "color" for 3-channel data, else "gray"."""
    return arch if arch != "auto" else ("color" if channels == 3 else "gray")


def score_sets(sets: dict[str, data.ImageSet], batch_size: int,
               score_batch: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> Scores:
    """Scores of every set, ``{set: {score: (N,) array}}``: ``score_batch`` maps a float [0,1]
    batch to ``{score: (B,)}``; sets are sliced into batches on their device."""
    out = {}
    for name, s in sets.items():
        parts: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(s), batch_size):
            for k, v in score_batch(data.to_float(s.x[i : i + batch_size])).items():
                parts.setdefault(k, []).append(v.detach())
        out[name] = {k: torch.cat(v).cpu().numpy() for k, v in parts.items()}
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_sets(cfg: TrialConfig, device: torch.device) -> tuple[data.ImageSet, dict[str, data.ImageSet]]:
    """ID train set and test sets {"id" | ood_key: ImageSet}, on device, subset per config."""
    pad_to = 32 if cfg.pad else None

    def load(spec: str, split: str, n: int | None) -> data.ImageSet:
        s = data.load(spec, split, pad_to=pad_to, device=device)
        return s if n is None or n >= len(s) else data.ImageSet(s.x[:n], None if s.y is None else s.y[:n], s.name)

    train = load(cfg.id, "train", cfg.train_n)
    tests = {"id": load(cfg.id, "test", cfg.test_n), **{set_key(o): load(o, "test", cfg.test_n) for o in cfg.ood}}
    for name, s in tests.items():
        same_shape(name, s.shape, train.shape)
    return train, tests


def descend(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One optimiser step on ``loss``: clear the gradients, backpropagate, step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


class EpochMeans:
    """Running means of a training step's loss parts over one epoch.

    ``add`` takes tensors (kept on the device: no sync per step) or floats; ``means``
    returns floats and raises FloatingPointError naming the parts that went non-finite,
    which the trainable turns into a failed trial with that reason.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.n = 0

    def add(self, parts: dict[str, Any]) -> None:
        for k, v in parts.items():
            v = v.detach() if isinstance(v, torch.Tensor) else v
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1

    def means(self, epoch: int) -> dict[str, float]:
        out = {k: float(v) / max(self.n, 1) for k, v in self.sums.items()}
        bad = [k for k, v in out.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"{', '.join(bad)} became non-finite in epoch {epoch}; try a smaller lr")
        return out


@dataclass
class EpochResult:
    epoch: int
    train: dict[str, float]  # mean loss terms over the epoch
    metrics: dict[str, float] = field(default_factory=dict)  # flat metric table (when evaluated)
    scores: Scores | None = None  # raw scores (when evaluated)
    seconds: float = 0.0


C = TypeVar("C", bound=TrialConfig)


class Experiment(abc.ABC, Generic[C]):
    """One trial of a method: ``__init__(cfg)`` builds data and model (calling ``start``);
    the abstract methods are what a method must write, everything else is shared.

    Subclasses set ``cfg``, ``device``, ``epoch`` (``start`` does) and hold in
    ``state_dict`` all a checkpoint needs to resume the trial bit for bit.
    """

    cfg: C
    device: torch.device
    epoch: int = 0
    train_x: torch.Tensor  # ID training images, uint8 on the device (for ``shuffled_epoch``)
    gen: torch.Generator  # the trial's batch-order generator (for ``shuffled_epoch``)

    @abc.abstractmethod
    def __init__(self, cfg: C) -> None:
        """Load data (``self.start(cfg)``), build the model and optimisers; no training yet."""

    def start(self, cfg: C) -> data.ImageSet:
        """Common start of a method's ``__init__``: config, device, seed, test sets on the
        device (``self.test``); returns the ID training set."""
        self.cfg, self.device, self.epoch = cfg, resolve_device(cfg.device), 0
        torch.manual_seed(cfg.seed)
        train, self.test = load_sets(cfg, self.device)
        return train

    @abc.abstractmethod
    def train_epoch(self) -> dict[str, float]:
        """One epoch of training; returns the mean of each loss part (``shuffled_epoch`` helps)."""

    def shuffled_epoch(self, step: Callable[[torch.Tensor], dict[str, Any]],
                       opt: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """One shuffled pass over ``self.train_x`` in ``cfg.batch_size`` batches, the order drawn from
        ``self.gen``: ``step(idx)`` returns one batch's loss parts, and with ``opt`` given the pass
        descends on ``parts["loss"]`` (without, ``step`` makes its own updates); returns their means."""
        means = EpochMeans()
        for idx in data.batch_indices(len(self.train_x), self.cfg.batch_size, shuffle=True, generator=self.gen,
                                      device=self.device):
            parts = step(idx)
            if opt is not None:
                descend(opt, parts["loss"])
            means.add(parts)
        return means.means(self.epoch + 1)

    @abc.abstractmethod
    def score(self) -> Scores:
        """Scores of ``self.test`` (ID test and each OOD set), higher = more OOD."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything to resume: weights, optimiser states, RNG states, epoch."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of ``state_dict``."""

    def write_artifacts(self, folder: Path) -> None:
        """Optional: write method-specific files (figures, sample grids) for the final MLflow run."""

    def score_generator(self) -> torch.Generator:
        """A fresh generator for an evaluation's random draws (seed + 1): scores do not depend on
        how many evaluations came before, so a resumed trial scores as an uninterrupted one."""
        return torch.Generator(device=self.device).manual_seed(self.cfg.seed + 1)

    def evaluate(self) -> tuple[dict[str, float], Scores]:
        scores = self.score()
        return metric_table(scores, self.cfg.ood), scores

    def step(self) -> EpochResult:
        """Train one epoch, evaluate when due."""
        t0 = time.perf_counter()
        if self.cfg.fail_at_epoch == self.epoch + 1:
            raise FloatingPointError(f"loss became nan in epoch {self.epoch + 1} (injected by fail_at_epoch)")
        res = EpochResult(self.epoch + 1, self.train_epoch())
        self.epoch = res.epoch
        if self.epoch % self.cfg.eval_every == 0 or self.done:
            res.metrics, res.scores = self.evaluate()
        res.seconds = time.perf_counter() - t0
        return res

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.epochs
