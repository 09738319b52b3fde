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
import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from oodlab import data, naming
from oodlab.metrics import METRICS, ood_metrics

# metric naming lives in oodlab.naming; methods import these names from here with the contract
from oodlab.naming import VAL, is_val_metric, metric_name, score_key, set_key, val_id_name  # noqa: F401

Scores = dict[str, dict[str, np.ndarray]]  # {"id" | ood_key | "val_id" | "val_"+val_key: {score_name: (N,) array}}
FUSE = ("auto", "fused", "looped")
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
    # Validation (model selection): val_n ID *training* images are held out (never trained on,
    # drawn with a fixed seed before train_n subsetting) and scored against each val_ood set
    # (test_n caps every scored set, validation ones included). val_ood must share no source with
    # the ID set, a test OOD set or a set the method trains on (``training_sets``); see docs/validation.md.
    val_n: int = 5000  # of Fashion-MNIST's 60,000 training images
    val_ood: tuple[str, ...] = ("blobs", "constant")  # validation OOD sets (comma string; synthetic: at the ID shape)
    train_n: int | None = None  # use only this many ID training images (None = all; after the holdout)
    test_n: int | None = None  # score only this many images of each set, test and validation (None = all)
    pad: bool = False  # zero-pad 28×28 to 32×32, as paper 000 does
    # --- optimisation ---
    epochs: int = 100
    batch_size: int = 50
    lr: float = 1e-4
    seed: int = 0  # the first replicate's seed: a trial trains seeds seed, seed+1, …, seed+seeds-1
    seeds: int = 1  # replicates of this configuration trained in one trial (oodlab.replicates)
    # how replicates train: "fused" as one batched model (methods that support it), "looped" one after
    # another, "auto" = fused on a GPU, looped on a CPU (benchmarks/replicates.py measured both)
    fuse: str = "auto"
    # --- evaluation ---
    eval_every: int = 1  # evaluate every k epochs and after the last
    eval_batch_size: int = 1000
    device: str = "auto"  # "auto" = cuda if visible, else cpu
    fail_at_epoch: int | None = None  # fault injection (tests): the loss "diverges" at this epoch

    def __post_init__(self) -> None:
        for name in ("ood", "val_ood"):
            specs = getattr(self, name)
            object.__setattr__(self, name, tuple(naming.split_specs(specs) if isinstance(specs, str) else specs))
        require([
            (len(self.ood) > 0, "ood: give at least one OOD set"),
            (len(self.val_ood) > 0, "val_ood: give at least one validation OOD set"),
            (self.val_n >= 1, f"val_n must be >= 1 (ID training images held out for validation), got {self.val_n}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (1 <= self.seeds <= 100, f"seeds must be in 1..100 (replicates per trial), got {self.seeds}"),
            (self.fuse in FUSE, f"fuse must be one of {', '.join(FUSE)}; got {self.fuse!r}"),
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
        for name, specs in (("OOD", self.ood), ("validation OOD", self.val_ood)):
            keys = [set_key(s) for s in specs]
            if len(set(keys)) != len(keys):
                raise ConfigError(f"{name} sets must have distinct names, got {keys}")
            if any(k == "id" or k.startswith(VAL) for k in keys):
                raise ConfigError(f"{name} set names may not be 'id' or start with {VAL!r}, got {keys}")
        self.check_validation_disjoint()

    def training_sets(self) -> list[str]:
        """Specs of the non-ID sets the method trains on (e.g. negatives); validation must avoid them."""
        return []

    def check_validation_disjoint(self) -> None:
        """ConfigError if a validation OOD set shares a source with the ID set, a test OOD set or a
        set the method trains on: selecting on it would select on the test (or on training data)."""
        others = [("the ID set", self.id)] + [("test OOD set", o) for o in self.ood] + \
            [("training set", t) for t in self.training_sets()]
        for v in self.val_ood:
            for what, o in others:
                if data.share_source(v, o):
                    raise ConfigError(f"validation OOD set {v!r} shares its source with {what} {o!r}; choose "
                                      "val_ood disjoint from the test and training sets (docs/validation.md)")

    def data_requests(self) -> list[tuple[str, str]]:
        """(spec, split) of every set the trial loads; the runner loads each once up front."""
        return [(self.id, "train"), (self.id, "test"), *[(o, "test") for o in (*self.ood, *self.val_ood)]]

    def metric_names(self) -> list[str]:
        """Every flat metric the trial reports at an evaluation: test, validation, and the ID-validation means."""
        scores = self.score_names()
        return [metric_name(m, o, s, split) for split, sets in (("test", self.ood), ("val", self.val_ood))
                for o in sets for s in scores for m in METRICS] + [val_id_name(s) for s in scores]

    def check_sizes(self, sizes: dict[tuple[str, str], int]) -> None:
        """Check set sizes before any compute; ``sizes``: (spec, split) -> number of images. Raise ConfigError."""
        n = sizes[(self.id, "train")]
        if self.val_n >= n:
            raise ConfigError(f"val_n={self.val_n} but the ID training set {self.id!r} has only {n} images; "
                              f"hold out fewer (val_n < {n})")

    def check_data(self, sets: SetInfos) -> None:
        """Check the method fits the data before any compute; ``sets``: (spec, split) -> SetInfo of
        every set in ``data_requests()`` as loaded (after padding). Raise ConfigError. The runner
        calls it for every config before Ray starts; methods extend it with their model's checks."""
        train = sets[(self.id, "train")].shape
        for spec in (self.id, *self.ood, *(v for v in self.val_ood if not data.takes_shape(v))):
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
        d["val_ood"] = ",".join(self.val_ood)
        return d


def metric_table(scores: Scores, oods: tuple[str, ...], split: str = "test") -> dict[str, float]:
    """Flat table of ID vs each OOD set for every score: ID test vs test sets (``{metric}_{ood}_{score}``),
    or with split="val" ID validation vs validation sets (``val_{metric}_{ood}_{score}``)."""
    ref = scores["id" if split == "test" else VAL + "id"]
    table = {}
    for spec in oods:
        for score_name, s_out in scores[score_key(spec, split)].items():
            for m, v in ood_metrics(ref[score_name], s_out).items():
                table[metric_name(m, spec, score_name, split)] = v
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


def evaluation_table(scores: Scores, cfg: TrialConfig) -> dict[str, float]:
    """Test and validation metric tables plus ``val_id_{score}`` (mean score of the ID validation images)."""
    val_id = {val_id_name(k): float(np.mean(v)) for k, v in scores[VAL + "id"].items()}
    return {**metric_table(scores, cfg.ood), **metric_table(scores, cfg.val_ood, "val"), **val_id}


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


def _head(s: data.ImageSet, n: int | None) -> data.ImageSet:
    return s if n is None or n >= len(s) else data.ImageSet(s.x[:n], None if s.y is None else s.y[:n], s.name)


_shared: dict[tuple[Any, ...], tuple[data.ImageSet, dict[str, data.ImageSet]]] | None = None


@contextlib.contextmanager
def shared_sets() -> Iterator[None]:
    """Inside this block ``load_sets`` loads each data configuration once: the replicates of a trial
    share their (read-only, uint8) sets instead of each decoding and holding its own copy."""
    global _shared
    outer, _shared = _shared, {} if _shared is None else _shared
    try:
        yield
    finally:
        _shared = outer


def load_sets(cfg: TrialConfig, device: torch.device) -> tuple[data.ImageSet, dict[str, data.ImageSet]]:
    """ID training set and every scored set, on device: ``{"id" | ood_key: ...}`` (test) and
    ``{"val_id" | "val_"+val_key: ...}`` (validation). The ID validation images are held out of
    the training split first (``data.holdout``), then the rest is cut to ``train_n``; every scored
    set (test and validation, ID and OOD) is cut to ``test_n``."""
    key = (cfg.id, cfg.ood, cfg.val_ood, cfg.val_n, cfg.train_n, cfg.test_n, cfg.pad, str(device))
    if _shared is not None and key in _shared:
        return _shared[key]
    pad_to = 32 if cfg.pad else None

    def load(spec: str, split: str, n: int | None) -> data.ImageSet:
        return _head(data.load(spec, split, pad_to=pad_to, device=device), n)

    full = load(cfg.id, "train", None)
    # synthetic validation sets without channels=/size= are generated at the ID shape (before padding)
    native = (full.shape[0], 28, 28) if cfg.pad and full.shape[1] == 32 else full.shape
    cfg.check_sizes({(cfg.id, "train"): len(full)})
    rest, val_id = data.holdout(full, cfg.val_n)
    train = _head(rest, cfg.train_n)
    tests = {"id": load(cfg.id, "test", cfg.test_n),
             **{score_key(o): load(o, "test", cfg.test_n) for o in cfg.ood},
             VAL + "id": _head(val_id, cfg.test_n),
             **{score_key(v, "val"): load(data.at_shape(v, native), "test", cfg.test_n) for v in cfg.val_ood}}
    for name, s in tests.items():
        same_shape(name, s.shape, train.shape)
    if _shared is not None:
        _shared[key] = (train, tests)
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
    replicas: dict[int, EpochResult] = field(default_factory=dict)  # seed -> its own result (several replicates)


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
        """Common start of a method's ``__init__``: config, device, seed, the sets to score on the
        device (``self.eval_sets``: test and validation; ``self.test``: the test ones only);
        returns the ID training set (validation images held out)."""
        self.cfg, self.device, self.epoch = cfg, resolve_device(cfg.device), 0
        torch.manual_seed(cfg.seed)
        train, sets = load_sets(cfg, self.device)
        self.eval_sets = dict(sets)  # the sets may be shared with other replicates (shared_sets): not the dict
        self.test = {k: v for k, v in self.eval_sets.items() if not k.startswith(VAL)}
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
        """Scores of every set in ``self.eval_sets`` (test and validation), keyed as there."""

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
        """Score every set in ``self.eval_sets``; the test and validation tables (``evaluation_table``)."""
        scores = self.score()
        return evaluation_table(scores, self.cfg), scores

    def step(self) -> EpochResult:
        """Train one epoch, evaluate when due."""
        t0 = time.perf_counter()
        self.check_fault()
        return self.close_epoch(self.train_epoch(), t0)

    def check_fault(self) -> None:
        """Fault injection for tests: ``fail_at_epoch`` makes the coming epoch "diverge"."""
        if self.cfg.fail_at_epoch == self.epoch + 1:
            raise FloatingPointError(f"loss became nan in epoch {self.epoch + 1} (injected by fail_at_epoch)")

    def close_epoch(self, train: dict[str, float], t0: float) -> EpochResult:
        """Count an epoch trained (its mean loss parts ``train``, started at ``t0``); evaluate when due."""
        res = EpochResult(self.epoch + 1, train)
        self.epoch = res.epoch
        if self.epoch % self.cfg.eval_every == 0 or self.done:
            res.metrics, res.scores = self.evaluate()
        res.seconds = time.perf_counter() - t0
        return res

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.epochs
