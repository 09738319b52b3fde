"""Negative-prior VAE training (Csiszárik et al., paper 000, §III-A).

Inliers x maximise the ELBO under the standard prior p(z) = N(0, I); negatives x̄ have
their approximate posterior pushed towards the negative prior p̄(z) = N(shift·1, I):

    L_np = E_x[ −ELBO(x) ] + w · E_x̄[ KL( q(z|x̄) || p̄(z) ) ]

The added term is non-negative, so L_np still upper-bounds the inliers' NLL; it trains
the encoder to separate inliers and outliers in latent space. ``w`` is ``neg_weight``.
With no negatives this is the plain VAE baseline. Scores: BPD and KL (and IWAE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from oodlab import data
from oodlab.experiment import Experiment as BaseExperiment
from oodlab.experiment import ConfigError, Scores, TrialConfig, _check, load_sets, resolve_device, set_key
from oodlab.models.vae import ARCHS, DECODERS, VAE, VAEConfig, build_vae
from oodlab.priors import kl_to_normal
from oodlab.scores import elbo_terms, score_batch

NEGATIVES = ("none", "aux")
OPTIMIZERS = ("rmsprop", "adam")


def loss(model: VAE, x: torch.Tensor, x_neg: torch.Tensor | None, shift: float, neg_weight: float) -> dict[str, torch.Tensor]:
    """Batch-mean loss and its parts (scalars): ``loss``, ``nelbo``, ``kl``, ``neg_kl``."""
    t = elbo_terms(model, x)
    nelbo = -t["elbo"].mean()
    out = {"nelbo": nelbo, "kl": t["kl"].mean(), "loss": nelbo}
    if x_neg is not None:
        mu, logvar = model.encode(x_neg)
        neg_kl = kl_to_normal(mu, logvar, mean=shift).mean()
        out["neg_kl"] = neg_kl
        out["loss"] = nelbo + neg_weight * neg_kl
    return out


@dataclass(frozen=True)
class Config(TrialConfig):
    # --- model ---
    arch: str = "auto"  # "gray" | "color" | "auto" (color for 3-channel data)
    decoder: str = "bernoulli"  # noise model: "bernoulli" | "gaussian"
    latent_dim: int = 10  # paper 000: 10
    optimizer: str = "rmsprop"  # paper 000: RMSProp for gray, Adam for color
    # --- negatives ---
    negatives: str = "none"  # "none" (baseline VAE) | "aux" (auxiliary dataset)
    aux: str = "notmnist"  # auxiliary negative set (paper: EMNIST-Letters for Fashion-MNIST)
    aux_split: str = "test"  # split of the aux set to draw negatives from (offline notMNIST has only "test")
    shift: float = 8.0  # negative prior N(shift·1, I); paper: 8 gray, 25 color
    neg_weight: float = 1.0  # weight of the negatives' KL term
    iwae_k: int = 0  # also score the IWAE bound with k samples (0 = off)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check([
            (self.arch in ("auto", *ARCHS), f"arch must be one of auto, {', '.join(ARCHS)}; got {self.arch!r}"),
            (self.decoder in DECODERS, f"decoder must be one of {', '.join(DECODERS)}; got {self.decoder!r}"),
            (self.negatives in NEGATIVES, f"negatives must be one of {NEGATIVES}; got {self.negatives!r}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}"),
            (self.aux_split in ("train", "test"), f"aux_split must be train or test; got {self.aux_split!r}"),
            (self.negatives != "aux" or set_key(self.aux) not in {set_key(s) for s in self.ood},
             f"aux set {self.aux!r} is also an OOD test set: negatives would leak into evaluation"),
            (self.latent_dim >= 1, f"latent_dim must be >= 1, got {self.latent_dim}"),
            (0 <= self.shift <= 1000, f"shift must be in [0, 1000], got {self.shift}"),
            (self.neg_weight >= 0, f"neg_weight must be >= 0, got {self.neg_weight}"),
            (self.iwae_k >= 0, f"iwae_k must be >= 0, got {self.iwae_k}"),
        ])

    def score_names(self) -> tuple[str, ...]:
        return ("bpd", "kl", "iwae") if self.iwae_k > 0 else ("bpd", "kl")

    def data_requests(self) -> list[tuple[str, str]]:
        return super().data_requests() + ([(self.aux, self.aux_split)] if self.negatives == "aux" else [])


class Experiment(BaseExperiment):
    """Data on device, VAE, optimizer and progress of one negative-prior trial."""

    def __init__(self, cfg: Config):
        self.cfg, self.device, self.epoch = cfg, resolve_device(cfg.device), 0
        torch.manual_seed(cfg.seed)
        train, self.test = load_sets(cfg, self.device)
        self.train_x = train.x  # (N, C, H, W) uint8 on device
        self.aux_x = None
        if cfg.negatives == "aux":
            self.aux_x = data.load(cfg.aux, cfg.aux_split, pad_to=32 if cfg.pad else None, device=self.device).x
            if self.aux_x.shape[1:] != self.train_x.shape[1:]:
                raise ConfigError(f"aux set {cfg.aux!r} has images of shape {tuple(self.aux_x.shape[1:])} "
                                  f"but the ID set has {tuple(self.train_x.shape[1:])}")
        c, h, _ = self.train_x.shape[1:]
        arch = cfg.arch if cfg.arch != "auto" else ("color" if c == 3 else "gray")
        try:
            vcfg = VAEConfig(arch=arch, decoder=cfg.decoder, channels=c, size=h, latent_dim=cfg.latent_dim)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.model = build_vae(vcfg).to(self.device)
        opt = torch.optim.RMSprop if cfg.optimizer == "rmsprop" else torch.optim.Adam
        self.opt = opt(self.model.parameters(), lr=cfg.lr)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # batch order and negative draws

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
            parts = loss(model, x, x_neg, shift=cfg.shift, neg_weight=cfg.neg_weight)
            self.opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            self.opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach()
            n_batches += 1
        out = {k: float(v) / n_batches for k, v in sums.items()}
        if not math.isfinite(out["loss"]):
            raise FloatingPointError(f"loss became {out['loss']} in epoch {self.epoch + 1}; try a smaller lr")
        return out

    @torch.no_grad()
    def score(self) -> Scores:
        self.model.eval()
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 1)
        out = {}
        for name, s in self.test.items():
            parts: dict[str, list[torch.Tensor]] = {}
            for i in range(0, len(s), self.cfg.eval_batch_size):
                x = data.to_float(s.x[i : i + self.cfg.eval_batch_size])
                for k, v in score_batch(self.model, x, self.cfg.iwae_k, gen).items():
                    parts.setdefault(k, []).append(v)
            out[name] = {k: torch.cat(v).cpu().numpy() for k, v in parts.items()}
        return out

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
