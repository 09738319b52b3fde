"""One trial, pure: config -> data -> model -> epochs of training -> OOD evaluation.

This is the science end of the pipeline; it knows nothing of Ray, Optuna or MLflow.
``Experiment`` holds the state a checkpoint needs; ``run_trial`` is the bare loop that
benchmarks and tests call, and ``oodlab.trainable`` wraps the same object for Ray Tune.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from oodlab import data, methods
from oodlab.metrics import ood_metrics
from oodlab.models.vae import ARCHS, DECODERS, VAEConfig, build_vae
from oodlab.scores import score_batch

OPTIMIZERS = ("rmsprop", "adam")


class ConfigError(ValueError):
    """A trial configuration that cannot run; raised before any compute."""


@dataclass(frozen=True)
class TrialConfig:
    # --- data ---
    id: str = "fashion_mnist"  # in-distribution set (train split for training, test split for scoring)
    ood: tuple[str, ...] = ("mnist",)  # OOD test sets, each scored and reported on its own
    train_n: int | None = None  # use only this many ID training images (None = all)
    test_n: int | None = None  # score only this many images of each test set (None = all)
    pad: bool = False  # zero-pad 28×28 to 32×32, as paper 000 does
    # --- model ---
    arch: str = "auto"  # "gray" | "color" | "auto" (color for 3-channel data)
    decoder: str = "bernoulli"  # noise model: "bernoulli" | "gaussian"
    latent_dim: int = 10
    # --- method ---
    method: str = "negprior"
    negatives: str = "none"  # "none" (baseline VAE) | "aux" (auxiliary dataset)
    aux: str = "notmnist"  # auxiliary negative set (paper: EMNIST-Letters for Fashion-MNIST)
    aux_split: str = "test"  # split of the aux set to draw negatives from (offline notMNIST has only "test")
    shift: float = 8.0  # negative prior N(shift·1, I); paper: 8 gray, 25 color
    neg_weight: float = 1.0  # weight of the negatives' KL term
    # --- optimisation ---
    epochs: int = 100
    batch_size: int = 50
    lr: float = 1e-4
    optimizer: str = "rmsprop"  # paper: RMSProp for gray, Adam for color
    seed: int = 0
    # --- evaluation ---
    eval_every: int = 1  # evaluate after epoch 1, every k epochs, and after the last
    eval_batch_size: int = 1000
    iwae_k: int = 0  # also score the IWAE bound with k samples (0 = off)
    device: str = "auto"  # "auto" = cuda if visible, else cpu

    def __post_init__(self) -> None:
        if isinstance(self.ood, str):
            object.__setattr__(self, "ood", tuple(data.split_specs(self.ood)))
        else:
            object.__setattr__(self, "ood", tuple(self.ood))
        checks = [
            (len(self.ood) > 0, "ood: give at least one OOD set"),
            (self.arch in ("auto", *ARCHS), f"arch must be one of auto, {', '.join(ARCHS)}; got {self.arch!r}"),
            (self.decoder in DECODERS, f"decoder must be one of {', '.join(DECODERS)}; got {self.decoder!r}"),
            (self.negatives in methods.negprior.NEGATIVES, f"negatives must be one of {methods.negprior.NEGATIVES}; got {self.negatives!r}"),
            (self.aux_split in ("train", "test"), f"aux_split must be train or test; got {self.aux_split!r}"),
            (self.negatives != "aux" or set_key(self.aux) not in {set_key(s) for s in self.ood},
             f"aux set {self.aux!r} is also an OOD test set: negatives would leak into evaluation"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}"),
            (self.latent_dim >= 1, f"latent_dim must be >= 1, got {self.latent_dim}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (0 < self.lr < 1, f"lr must be in (0, 1), got {self.lr}"),
            (0 <= self.shift <= 1000, f"shift must be in [0, 1000], got {self.shift}"),
            (self.neg_weight >= 0, f"neg_weight must be >= 0, got {self.neg_weight}"),
            (self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}"),
            (self.iwae_k >= 0, f"iwae_k must be >= 0, got {self.iwae_k}"),
            (self.train_n is None or self.train_n >= 1, f"train_n must be >= 1, got {self.train_n}"),
            (self.test_n is None or self.test_n >= 1, f"test_n must be >= 1, got {self.test_n}"),
            (self.device in ("auto", "cpu") or self.device.startswith("cuda"), f"device must be auto, cpu or cuda[:k]; got {self.device!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        try:
            methods.get(self.method)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for spec in self.data_specs():
            try:
                data.validate(spec)
            except data.DataError as e:
                raise ConfigError(str(e)) from None
        keys = [set_key(s) for s in self.ood]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"OOD sets must have distinct names, got {keys}")

    def data_specs(self) -> list[str]:
        return [self.id, *self.ood, *([self.aux] if self.negatives == "aux" else [])]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known: {sorted(known)}")
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class EpochResult:
    epoch: int
    train: dict[str, float]  # mean loss terms over the epoch
    metrics: dict[str, float] = field(default_factory=dict)  # flat metric table (when evaluated)
    scores: dict[str, dict[str, np.ndarray]] | None = None  # {"id"|ood_key: {score: (N,)}} when evaluated
    seconds: float = 0.0


class Experiment:
    """Data on device, model, optimizer and progress of one trial; checkpointable."""

    def __init__(self, cfg: TrialConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        pad_to = 32 if cfg.pad else None
        load = lambda spec, split, n=None: _subset(data.load(spec, split, pad_to=pad_to, device=self.device), n)  # noqa: E731
        self.train_x = load(cfg.id, "train", cfg.train_n).x  # (N, C, H, W) uint8 on device
        self.test = {"id": load(cfg.id, "test", cfg.test_n).x}
        for spec in cfg.ood:
            self.test[set_key(spec)] = load(spec, "test", cfg.test_n).x
        self.aux_x = load(cfg.aux, cfg.aux_split).x if cfg.negatives == "aux" else None
        c, h, w = self.train_x.shape[1:]
        for name, x in [*self.test.items(), ("aux", self.aux_x)]:
            if x is not None and tuple(x.shape[1:]) != (c, h, w):
                raise ConfigError(
                    f"set {name!r} has images of shape {tuple(x.shape[1:])} but the ID set has {(c, h, w)}; "
                    "make them match with modifiers such as [channels=3,size=32]"
                )
        arch = cfg.arch if cfg.arch != "auto" else ("color" if c == 3 else "gray")
        try:
            vcfg = VAEConfig(arch=arch, decoder=cfg.decoder, channels=c, size=h, latent_dim=cfg.latent_dim)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.model = build_vae(vcfg).to(self.device)
        opt = torch.optim.RMSprop if cfg.optimizer == "rmsprop" else torch.optim.Adam
        self.opt = opt(self.model.parameters(), lr=cfg.lr)
        self.method = methods.get(cfg.method)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # batch order and negative draws
        self.epoch = 0

    def train_epoch(self) -> dict[str, float]:
        """One pass over the ID training set; returns mean loss terms."""
        cfg, model = self.cfg, self.model
        model.train()
        sums: dict[str, torch.Tensor] = {}
        n_batches = 0
        for idx in data.batch_indices(len(self.train_x), cfg.batch_size, shuffle=True, generator=self.gen, device=self.device):
            x = data.to_float(self.train_x[idx])
            x_neg = None
            if self.aux_x is not None:
                j = torch.randint(len(self.aux_x), (len(idx),), generator=self.gen).to(self.device)
                x_neg = data.to_float(self.aux_x[j])
            parts = self.method.loss(model, x, x_neg, shift=cfg.shift, neg_weight=cfg.neg_weight)
            self.opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            self.opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach()
            n_batches += 1
        self.epoch += 1
        out = {k: float(v) / n_batches for k, v in sums.items()}
        if not math.isfinite(out["loss"]):
            raise FloatingPointError(f"loss became {out['loss']} in epoch {self.epoch}; try a smaller lr")
        return out

    @torch.no_grad()
    def score(self) -> dict[str, dict[str, np.ndarray]]:
        """Scores of every test set: {"id" | ood_key: {score_name: (N,) array}}."""
        self.model.eval()
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 1)
        out = {}
        for name, x in self.test.items():
            parts: dict[str, list[torch.Tensor]] = {}
            for i in range(0, len(x), self.cfg.eval_batch_size):
                s = score_batch(self.model, data.to_float(x[i : i + self.cfg.eval_batch_size]), self.cfg.iwae_k, gen)
                for k, v in s.items():
                    parts.setdefault(k, []).append(v)
            out[name] = {k: torch.cat(v).cpu().numpy() for k, v in parts.items()}
        return out

    def evaluate(self) -> tuple[dict[str, float], dict[str, dict[str, np.ndarray]]]:
        """Flat metric table ``{metric}_{ood}_{score}`` and the raw scores."""
        scores = self.score()
        table = {}
        for spec in self.cfg.ood:
            for score_name, s_out in scores[set_key(spec)].items():
                for m, v in ood_metrics(scores["id"][score_name], s_out).items():
                    table[metric_name(m, spec, score_name)] = v
        return table, scores

    def step(self) -> EpochResult:
        """Train one epoch, evaluate when due."""
        t0 = time.perf_counter()
        train = self.train_epoch()
        res = EpochResult(self.epoch, train)
        if self.epoch == 1 or self.epoch % self.cfg.eval_every == 0 or self.done:
            res.metrics, res.scores = self.evaluate()
        res.seconds = time.perf_counter() - t0
        return res

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.epochs

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue mid-trial; loadable with ``torch.load(weights_only=True)``."""
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "epoch": self.epoch,
                "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.epoch = int(state["epoch"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])


def _subset(s: data.ImageSet, n: int | None) -> data.ImageSet:
    """First n images (datasets are stored in a fixed order; use [n=..] for a shuffled subset)."""
    return s if n is None or n >= len(s) else data.ImageSet(s.x[:n], None if s.y is None else s.y[:n], s.name)


def run_trial(config: dict[str, Any] | TrialConfig, on_epoch: Callable[[EpochResult], None] | None = None) -> EpochResult:
    """Run a whole trial without Ray; returns the last epoch's result."""
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    exp = Experiment(cfg)
    res = None
    while not exp.done:
        res = exp.step()
        if on_epoch:
            on_epoch(res)
    return res
