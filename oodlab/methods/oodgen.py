"""OOD sample generation with a CVAE and an (n+1)-class classifier (Vernekar et al., paper 002).

A conditional VAE learns the ID sub-manifolds (one per class). Two kinds of "effective"
OOD samples are generated from it (Type I off the manifold, Type II on it beyond the 95%
latent ellipsoid: ``oodlab.methods.oodgen_samples``) and fed to an (n+1)-class classifier
as class n+1.

The classifier is trained with cross-entropy, OOD samples weighted ``ood_weight``
(paper: 0.1), Adadelta (paper: lr 0.1 for Fashion-MNIST; Keras' ρ = 0.95, ε = 1e-7, which
the authors' notebook uses); OOD score ``n1_prob`` = p(y = n+1 | x). Its accuracy ``acc_n1``
is the paper's: the argmax over all n+1 classes, so predicting the OOD class for an ID test
image is an error; ``acc_n1_among_id`` takes the argmax over the n ID classes only. The
same trial can train the paper's baselines on a plain n-class classifier of the same
architecture (``oodlab.methods.classifier_baselines``) and a confident classifier (Lee et
al. 2018a: joint GAN + confidence loss, paper's Eq. 5).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from oodlab import data
from oodlab.experiment import ConfigError, Scores, SetInfos, TrialConfig, descend, labels_of, require, score_sets
from oodlab.experiment import Experiment as BaseExperiment
from oodlab.methods import classifier_baselines as cb
from oodlab.methods.oodgen_samples import LatentGaussians, Type1Spec, fit_latent_gaussians, type1, type2
from oodlab.models.classifier import CLASSIFIER_ARCHS, Classifier, Discriminator, Generator
from oodlab.models.cvae import CVAE, CVAEConfig

OPTIMIZERS = ("adadelta", "adam", "sgd")
CVAE_OPTIMIZERS = ("rmsprop", "adam")
DIRECTIONS = ("basis_mix", "uniform")
SIGNS = ("random", "positive")
FMNIST_OOD = ("fashion_mnist[labels=5-9]", "mnist", "notmnist", "omniglot", "gaussian_noise", "uniform_noise")


# ---------------------------------------------------------------- config

@dataclass(frozen=True)
class Config(TrialConfig):
    method: str = "oodgen"
    id: str = "fashion_mnist[labels=0-4]"  # ID classes (labels are remapped to 0..n-1)
    ood: tuple[str, ...] = FMNIST_OOD
    val_n: int = 2500  # of the 30,000 training images of classes 0-4
    val_ood: tuple[str, ...] = ("blobs", "constant")  # FMNIST_OOD holds every other offline set
    epochs: int = 10  # classifier epochs (the CVAE trains first, `cvae_epochs` passes, inside epoch 1)
    batch_size: int = 128
    lr: float = 0.1  # classifier learning rate (paper: Adadelta 0.1 for Fashion-MNIST, 0.01 for MNIST)
    # --- CVAE (defaults: the authors' notebook; text: the paper's text, oodlab.models.cvae) ---
    latent_dim: int = 10  # paper: 10 for Fashion-MNIST, 8 for MNIST
    cvae_arch: str = "authors"  # authors | text (oodlab.models.cvae)
    cvae_epochs: int = 100  # passes over the ID training set before the classifiers start (authors: 100)
    cvae_lr: float = 1e-3
    cvae_optimizer: str = "rmsprop"  # rmsprop (authors: Keras RMSprop, ρ 0.9, ε 1e-7) | adam
    cvae_sample: bool = False  # reconstruct from a sampled z (True) or z = μ (authors' notebook)
    # --- generated OOD samples (defaults: the authors' notebook; the paper's text in brackets) ---
    beta_low: float = 0.1  # Type I perturbation size β ~ U[beta_low, beta_high]   [0.1]
    beta_high: float = 28.0  # [1.0]
    type1_direction: str = "basis_mix"  # basis_mix (rref null-space basis, U(−1,1) mix) | uniform
    beta_sign: str = "random"  # random ±1 per image | positive
    clip: bool = True  # clip Type I images to [0, 1]   [no]
    radius_factor: float = 1.5  # Type II radius ρ ~ U[r95, radius_factor·r95]   [1 = the ellipsoid surface]
    quantile: float = 0.95  # the ellipsoid holds this fraction of each class's training latents
    type1_frac: float = 0.5  # fraction of generated OOD samples that are Type I (rest Type II)
    ood_ratio: float = 1.0  # generated OOD samples per ID sample in a batch
    ood_pools: bool = True  # the notebook's schedule: one Type I sample per training image redrawn every
    # `type1_every` classifier epochs, one Type II per training image (its label) every epoch, batches
    # index both; False: fresh Type I / II samples drawn for every batch
    type1_every: int = 5  # classifier epochs between Type I pool redraws (the notebook: 5)
    ood_weight: float = 0.1  # weight of the OOD class in the cross-entropy (paper: 0.1)
    optimizer: str = "adadelta"  # classifier optimizer: adadelta | adam | sgd
    adadelta_rho: float = 0.95  # Adadelta's decay ρ (Keras, the authors' notebook: 0.95; PyTorch's default 0.9)
    adadelta_eps: float = 1e-7  # Adadelta's ε (Keras: 1e-7; PyTorch's default 1e-6)
    clf_arch: str = "notebook"  # notebook: conv–conv–pool, 9,216-wide dense input (the authors') | pooled
    # --- baselines on a plain n-class classifier (same architecture, same batches) ---
    baselines: bool = True  # also train the plain and the confident classifier and score their detectors
    odin_temperature: float = 1000.0  # ODIN T (Liang et al.)
    odin_eps: float = 0.0014  # ODIN input perturbation ε (fixed; the paper tunes it per OOD set)
    maha_eps: float = 0.0  # Mahalanobis input preprocessing ε (0 = off)
    mc_samples: int = 20  # MC-dropout passes
    conf_beta: float = 1.0  # confident classifier: weight β of KL(U || p(y|G(z))) (Lee et al. 2018a Eq. 5)
    gan_lr: float = 2e-4  # Adam lr of the confident classifier's GAN

    def __post_init__(self) -> None:
        super().__post_init__()
        require([
            (self.latent_dim >= 1, f"latent_dim must be >= 1, got {self.latent_dim}"),
            (self.cvae_epochs >= 1, f"cvae_epochs must be >= 1, got {self.cvae_epochs}"),
            (self.cvae_arch in ("authors", "text"), f"cvae_arch must be authors or text, got {self.cvae_arch!r}"),
            (self.cvae_optimizer in CVAE_OPTIMIZERS,
             f"cvae_optimizer must be one of {CVAE_OPTIMIZERS}, got {self.cvae_optimizer!r}"),
            (self.type1_direction in DIRECTIONS,
             f"type1_direction must be one of {DIRECTIONS}, got {self.type1_direction!r}"),
            (self.beta_sign in SIGNS, f"beta_sign must be one of {SIGNS}, got {self.beta_sign!r}"),
            (0 < self.cvae_lr < 1, f"cvae_lr must be in (0, 1), got {self.cvae_lr}"),
            (0 <= self.beta_low <= self.beta_high,
             f"need 0 <= beta_low <= beta_high, got {self.beta_low}, {self.beta_high}"),
            (self.radius_factor >= 1, f"radius_factor must be >= 1 (outside the ellipsoid), got {self.radius_factor}"),
            (0 < self.quantile < 1, f"quantile must be in (0, 1), got {self.quantile}"),
            (0 <= self.type1_frac <= 1, f"type1_frac must be in [0, 1], got {self.type1_frac}"),
            (0 < self.ood_ratio <= 10, f"ood_ratio must be in (0, 10], got {self.ood_ratio}"),
            (self.type1_every >= 1, f"type1_every must be >= 1, got {self.type1_every}"),
            (self.ood_weight >= 0, f"ood_weight must be >= 0, got {self.ood_weight}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}"),
            (0 < self.adadelta_rho < 1 and self.adadelta_eps > 0,
             f"need 0 < adadelta_rho < 1 and adadelta_eps > 0, got {self.adadelta_rho}, {self.adadelta_eps}"),
            (self.clf_arch in CLASSIFIER_ARCHS, f"clf_arch must be one of {CLASSIFIER_ARCHS}, got {self.clf_arch!r}"),
            (self.odin_temperature > 0, f"odin_temperature must be > 0, got {self.odin_temperature}"),
            (self.odin_eps >= 0 and self.maha_eps >= 0, "odin_eps and maha_eps must be >= 0"),
            (self.mc_samples >= 1, f"mc_samples must be >= 1, got {self.mc_samples}"),
            (self.conf_beta >= 0, f"conf_beta must be >= 0, got {self.conf_beta}"),
            (0 < self.gan_lr < 1, f"gan_lr must be in (0, 1), got {self.gan_lr}"),
        ])

    def cvae_config(self, shape: tuple[int, int, int], n_classes: int) -> CVAEConfig:
        """The CVAE for ID images of this (C, H, W) and n classes; ConfigError when it does not fit them."""
        c, h, w = shape
        if h != w or h % 4:  # the CVAE halves the side twice
            raise ConfigError(f"oodgen needs square images with a side divisible by 4, got {h}×{w}")
        try:
            return CVAEConfig(n_classes=n_classes, channels=c, size=h, latent_dim=self.latent_dim, arch=self.cvae_arch)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def check_data(self, sets: SetInfos) -> None:
        super().check_data(sets)
        train = sets[(self.id, "train")]
        classes = labels_of(self.id, train, "the CVAE and the classifiers")
        if len(classes) < 2:
            raise ConfigError(f"ID set {self.id!r} has {len(classes)} class; oodgen needs at least 2")
        self.cvae_config(train.shape, len(classes))

    @property
    def type1_spec(self) -> Type1Spec:
        return Type1Spec(self.beta_low, self.beta_high, self.type1_direction, self.beta_sign, self.clip)

    def score_names(self) -> tuple[str, ...]:
        base = ("n1_prob",)
        baselines = ("msp", "odin", "mahalanobis", "mc_dropout", "mutual_info", "confident")
        return base + (baselines if self.baselines else ())


def classifier_optimizer(cfg: Config, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The classifiers' optimiser: Adadelta with ``adadelta_rho``/``adadelta_eps`` (Keras' constants
    by default), Adam, or SGD with momentum 0.9; learning rate ``cfg.lr``."""
    if cfg.optimizer == "adadelta":
        return torch.optim.Adadelta(params, lr=cfg.lr, rho=cfg.adadelta_rho, eps=cfg.adadelta_eps)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)


def id_accuracies(logits: dict[str, torch.Tensor], y: torch.Tensor, n: int) -> dict[str, float]:
    """``acc_{k}``: argmax over all of classifier k's outputs equals the label (the (n+1)-way accuracy
    of the paper for ``n1``: predicting the OOD class n is an error); ``acc_n1_among_id``: the
    argmax over the n ID classes only."""
    out = {f"acc_{k}": (v.argmax(1) == y).float().mean().item() for k, v in logits.items()}
    if "n1" in logits:
        out["acc_n1_among_id"] = (logits["n1"][:, :n].argmax(1) == y).float().mean().item()
    return out


# ---------------------------------------------------------------- experiment

class Experiment(BaseExperiment[Config]):
    """CVAE, (n+1)-class classifier and (optionally) the baselines' classifiers of one trial."""

    cfg: Config

    def __init__(self, cfg: Config):
        train = self.start(cfg)
        if train.y is None or self.test["id"].y is None:
            raise ConfigError(f"ID set {cfg.id!r} has no labels; the CVAE and the classifiers need them")
        self.classes = torch.unique(train.y)  # ID labels -> 0..n-1
        self.train_x, self.train_y = train.x, torch.searchsorted(self.classes, train.y)
        self.test_y = torch.searchsorted(self.classes, self.test["id"].y)
        self.n = len(self.classes)
        c, h, _ = train.shape
        self.cvae = CVAE(cfg.cvae_config(train.shape, self.n)).to(self.device)
        self.cvae_opt: torch.optim.Optimizer = (
            torch.optim.RMSprop(self.cvae.parameters(), lr=cfg.cvae_lr, alpha=0.9, eps=1e-7)  # Keras' RMSprop defaults
            if cfg.cvae_optimizer == "rmsprop" else torch.optim.Adam(self.cvae.parameters(), lr=cfg.cvae_lr))
        self.clf = {"n1": Classifier(self.n + 1, c, h, arch=cfg.clf_arch).to(self.device)}
        if cfg.baselines:
            self.clf["plain"] = Classifier(self.n, c, h, arch=cfg.clf_arch).to(self.device)
            self.clf["conf"] = Classifier(self.n, c, h, arch=cfg.clf_arch).to(self.device)
            self.gan_g, self.gan_d = Generator(channels=c, size=h).to(self.device), Discriminator(c, h).to(self.device)
            self.g_opt = torch.optim.Adam(self.gan_g.parameters(), lr=cfg.gan_lr, betas=(0.5, 0.999))
            self.d_opt = torch.optim.Adam(self.gan_d.parameters(), lr=cfg.gan_lr, betas=(0.5, 0.999))
        self.opt = {k: classifier_optimizer(cfg, m.parameters()) for k, m in self.clf.items()}
        self.latents: LatentGaussians | None = None
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)  # batch order, OOD draws
        self.pool_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 3)  # the pools' draws
        self.pools: tuple[torch.Tensor, torch.Tensor] | None = None  # (Type I, Type II), one per training image
        self.type1_state: torch.Tensor | None = None  # pool_gen's state when the Type I pool was drawn

    # ---- CVAE
    def train_cvae(self, epochs: int) -> dict[str, float]:
        """``epochs`` passes of the CVAE ELBO, then the per-class latent Gaussians for Type II."""
        self.cvae.train()
        total, n = 0.0, 0
        for _ in range(epochs):
            batches = data.batch_indices(len(self.train_x), self.cfg.batch_size, shuffle=True, generator=self.gen,
                                         device=self.device)
            for idx in batches:
                x, y = data.to_float(self.train_x[idx]), self.train_y[idx]
                loss = -self.cvae.elbo_terms(x, y, self.gen, sample=self.cfg.cvae_sample)["elbo"].mean()
                descend(self.cvae_opt, loss)
                total, n = total + loss.item(), n + 1
        self.cvae.eval()
        self.latents = fit_latent_gaussians(self.encode_means(), self.train_y, self.n, self.cfg.quantile)
        if not math.isfinite(total):
            raise FloatingPointError("CVAE loss became non-finite; try a smaller cvae_lr")
        return {"cvae_nelbo": total / n}

    @torch.no_grad()
    def encode_means(self) -> torch.Tensor:
        bs = self.cfg.eval_batch_size
        return torch.cat([self.cvae.encode(data.to_float(self.train_x[i : i + bs]), self.train_y[i : i + bs])[0]
                          for i in range(0, len(self.train_x), bs)])

    def draw_pool(self, kind: str, gen: torch.Generator) -> torch.Tensor:
        """One Type I (``kind="type1"``, from each training image) or Type II (each image's label)
        sample per training image, in evaluation-size batches: (N, C, H, W)."""
        bs, out = self.cfg.eval_batch_size, []
        assert self.latents is not None, "train_cvae fits the latent Gaussians first"
        for i in range(0, len(self.train_x), bs):
            y = self.train_y[i : i + bs]
            if kind == "type1":
                out.append(type1(self.cvae, data.to_float(self.train_x[i : i + bs]), y, self.cfg.type1_spec, gen))
            else:
                out.append(type2(self.cvae, self.latents, y, self.cfg.radius_factor, gen))
        return torch.cat(out)

    def refresh_pools(self) -> None:
        """At the start of classifier epoch k (0-based): the Type I pool when k is a multiple of
        ``type1_every`` (or when missing: rebuilt from its saved draw state after a resume), the
        Type II pool every epoch."""
        k = self.epoch
        if k % self.cfg.type1_every == 0 or self.pools is None and self.type1_state is None:
            self.type1_state = self.pool_gen.get_state()
            pool1 = self.draw_pool("type1", self.pool_gen)
        elif self.pools is None:
            assert self.type1_state is not None
            replay = torch.Generator(device=self.device)
            replay.set_state(self.type1_state)
            pool1 = self.draw_pool("type1", replay)
        else:
            pool1 = self.pools[0]
        self.pools = (pool1, self.draw_pool("type2", self.pool_gen))

    def from_pools(self, m: int) -> tuple[torch.Tensor, int]:
        """m OOD samples at random indices (with replacement, as the notebook): Type I then Type II."""
        assert self.pools is not None, "refresh_pools runs at the start of every classifier epoch"
        j = torch.randint(len(self.train_x), (m,), generator=self.gen, device=self.device)
        m1 = round(self.cfg.type1_frac * m)
        return torch.cat([self.pools[0][j[:m1]], self.pools[1][j[m1:]]]), m1

    def generate(self, m: int) -> tuple[torch.Tensor, int]:
        """m OOD samples (Type I then Type II) from random training images / labels, and the Type I count."""
        cfg = self.cfg
        j = torch.randint(len(self.train_x), (m,), generator=self.gen, device=self.device)
        m1 = round(cfg.type1_frac * m)
        x1 = type1(self.cvae, data.to_float(self.train_x[j[:m1]]), self.train_y[j[:m1]], cfg.type1_spec, self.gen)
        assert self.latents is not None, "train_cvae fits the latent Gaussians first"
        x2 = type2(self.cvae, self.latents, self.train_y[j[m1:]], cfg.radius_factor, self.gen)
        return torch.cat([x1, x2]), m1

    # ---- classifiers
    def train_epoch(self) -> dict[str, float]:
        cfg = self.cfg
        out = self.train_cvae(cfg.cvae_epochs) if self.epoch == 0 else {}
        if cfg.ood_pools:
            self.refresh_pools()
        for m in self.clf.values():
            m.train()
        draw = self.from_pools if cfg.ood_pools else self.generate

        def step(idx: torch.Tensor) -> dict[str, float]:
            x, y = data.to_float(self.train_x[idx]), self.train_y[idx]
            x_ood, _ = draw(max(1, round(cfg.ood_ratio * len(idx))))
            parts = {"loss_n1": self.step_n1(x, y, x_ood)}
            if cfg.baselines:
                parts["loss_plain"] = self.step_plain(x, y)
                parts.update(self.step_confident(x, y))
            return parts

        out.update(self.shuffled_epoch(step))
        out.update(self.accuracies())
        out["loss"] = out["loss_n1"]
        return out

    def _update(self, key: str, loss: torch.Tensor) -> float:
        descend(self.opt[key], loss)
        return loss.item()

    def step_n1(self, x: torch.Tensor, y: torch.Tensor, x_ood: torch.Tensor) -> float:
        """Weighted cross-entropy over n ID classes + the OOD class n (paper §3.2, §4.3)."""
        logits = self.clf["n1"](torch.cat([x, x_ood]))
        target = torch.cat([y, torch.full((len(x_ood),), self.n, device=self.device)])
        w = torch.cat([torch.ones(len(x), device=self.device),
                       torch.full((len(x_ood),), self.cfg.ood_weight, device=self.device)])
        return self._update("n1", (w * F.cross_entropy(logits, target, reduction="none")).mean())

    def step_plain(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return self._update("plain", F.cross_entropy(self.clf["plain"](x), y))

    def step_confident(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """One joint step of Lee et al. 2018a (paper Eq. 5): D, then G (GAN + β·KL), then the classifier."""
        b, beta, clf = len(x), self.cfg.conf_beta, self.clf["conf"]
        fake = self.gan_g(torch.randn(b, self.gan_g.z_dim, generator=self.gen, device=self.device))
        ones, zeros = torch.ones(b, device=self.device), torch.zeros(b, device=self.device)
        d_loss = F.binary_cross_entropy_with_logits(self.gan_d(x), ones) + \
            F.binary_cross_entropy_with_logits(self.gan_d(fake.detach()), zeros)
        descend(self.d_opt, d_loss)
        g_loss = F.binary_cross_entropy_with_logits(self.gan_d(fake), ones) + beta * cb.kl_to_uniform(clf(fake)).mean()
        descend(self.g_opt, g_loss)
        c_loss = F.cross_entropy(clf(x), y) + beta * cb.kl_to_uniform(clf(fake.detach())).mean()
        return {"loss_conf": self._update("conf", c_loss), "loss_gan_d": d_loss.item(), "loss_gan_g": g_loss.item()}

    @torch.no_grad()
    def accuracies(self) -> dict[str, float]:
        """ID test accuracy of each classifier (``id_accuracies``)."""
        x, bs = self.test["id"].x, self.cfg.eval_batch_size
        logits = {}
        for k, m in self.clf.items():
            m.eval()
            logits[k] = torch.cat([m(data.to_float(x[i : i + bs])) for i in range(0, len(x), bs)])
        return id_accuracies(logits, self.test_y, self.n)

    # ---- scores
    def score(self) -> Scores:
        cfg = self.cfg
        for m in self.clf.values():
            m.eval()
        maha = None
        if cfg.baselines:
            maha = cb.MahalanobisDetector(cfg.maha_eps).fit(self.clf["plain"], data.to_float(self.train_x),
                                                            self.train_y, self.n)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # MC-dropout draws must not move training's RNG
            torch.manual_seed(cfg.seed + 1)
            return score_sets(self.eval_sets, cfg.eval_batch_size, lambda x: self.score_batch(x, maha))

    def score_batch(self, x: torch.Tensor, maha: cb.MahalanobisDetector | None) -> dict[str, torch.Tensor]:
        """Every detector's score for one batch, (B,) each, higher = more OOD."""
        with torch.no_grad():
            out = {"n1_prob": self.clf["n1"](x).softmax(-1)[:, self.n]}
        if maha is None:
            return out
        plain, cfg = self.clf["plain"], self.cfg
        with torch.no_grad():
            out["msp"] = cb.msp(plain(x))
            out["confident"] = cb.msp(self.clf["conf"](x))
            out.update(cb.mc_dropout(cb.mc_dropout_probs(plain, x, cfg.mc_samples)))
        out["odin"] = cb.odin(plain, x, cfg.odin_temperature, cfg.odin_eps)
        out["mahalanobis"] = maha(plain, x)
        return out

    # ---- artifacts and checkpoints
    def write_artifacts(self, folder: Path) -> None:
        """``ood_samples.png``: ID images, their Type I perturbations (and |x̃ − x|), Type II samples."""
        from torchvision.utils import make_grid

        from oodlab.plots import pyplot

        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 2)
        k = 16
        j = torch.randint(len(self.train_x), (k,), generator=gen, device=self.device)
        x, y = data.to_float(self.train_x[j]), self.train_y[j]
        x1 = type1(self.cvae, x, y, self.cfg.type1_spec, gen)
        diff = (x1 - x).abs()
        assert self.latents is not None, "train_cvae fits the latent Gaussians first"
        x2 = type2(self.cvae, self.latents, y, self.cfg.radius_factor, gen)
        rows = [("ID training images", x), ("Type I: x ± βv (clipped to [0,1])", x1.clamp(0, 1)),
                ("|x̃ − x| scaled to max", diff / diff.flatten(1).amax(1).view(-1, 1, 1, 1)),
                ("Type II: decoded z outside the 95% ellipsoid (same classes)", x2)]
        plt = pyplot()
        fig, axes = plt.subplots(len(rows), 1, figsize=(12, 2.2 * len(rows)))
        for ax, (title, imgs) in zip(axes, rows):
            ax.imshow(make_grid(imgs.cpu(), nrow=k, padding=2, pad_value=1.0).permute(1, 2, 0).numpy())
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(folder / "ood_samples.png", dpi=100)
        plt.close(fig)

    def state_dict(self) -> dict[str, Any]:
        s: dict[str, Any] = {"cvae": self.cvae.state_dict(), "cvae_opt": self.cvae_opt.state_dict(),
                             "clf": {k: m.state_dict() for k, m in self.clf.items()},
                             "opt": {k: o.state_dict() for k, o in self.opt.items()},
                             "epoch": self.epoch, "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                             "pool_gen": self.pool_gen.get_state()}
        if self.type1_state is not None:  # the Type I pool is rebuilt from it on resume, not stored
            s["type1_state"] = self.type1_state
        if self.latents is not None:
            s["latents"] = {"mean": self.latents.mean, "chol": self.latents.chol, "r95": self.latents.r95}
        if self.cfg.baselines:
            s["gan"] = {"g": self.gan_g.state_dict(), "d": self.gan_d.state_dict(),
                        "g_opt": self.g_opt.state_dict(), "d_opt": self.d_opt.state_dict()}
        return s

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cvae.load_state_dict(state["cvae"])
        self.cvae_opt.load_state_dict(state["cvae_opt"])
        self.cvae.eval()
        for k, m in self.clf.items():
            m.load_state_dict(state["clf"][k])
            self.opt[k].load_state_dict(state["opt"][k])
        if "latents" in state:
            self.latents = LatentGaussians(**state["latents"])
        if self.cfg.baselines:
            self.gan_g.load_state_dict(state["gan"]["g"])
            self.gan_d.load_state_dict(state["gan"]["d"])
            self.g_opt.load_state_dict(state["gan"]["g_opt"])
            self.d_opt.load_state_dict(state["gan"]["d_opt"])
        self.epoch = int(state["epoch"])
        self.gen.set_state(state["gen"])
        if "pool_gen" in state:
            self.pool_gen.set_state(state["pool_gen"])
        self.type1_state = state.get("type1_state")
        self.pools = None
        torch.set_rng_state(state["torch_rng"])
