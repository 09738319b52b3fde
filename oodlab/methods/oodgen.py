"""OOD sample generation with a CVAE and an (n+1)-class classifier (Vernekar et al., paper 002).

A conditional VAE learns the ID sub-manifolds (one per class). Two kinds of "effective"
OOD samples are generated from it and fed to an (n+1)-class classifier as class n+1:

* Type I (§3.1, Eq. 1–2): off the manifold. J(x) = ∂g(z, y)/∂z at z = μ(x, y) spans the
  tangent space; a unit vector v in the left null space of J (normal bundle) moves the image
  off it: x̃ = x ± β·v. Defaults follow the authors' notebook (sverneka/OODGen): v mixes the
  rref null-space basis of Jᵀ (sympy ``Matrix.nullspace``, each vector unit-normalised) with
  U(−1, 1) weights, β ~ U[0.1, 28], a random sign, x̃ clipped to [0, 1]. The paper's text
  (``type1_direction="uniform"``, β ~ U[0.1, 1], ``beta_sign="positive"``, ``clip=False``) is
  an option.
* Type II (§3.2, Eq. 3–4): on the manifold, beyond the ID boundary. Per class, fit a
  Gaussian (μ̂, Σ̂ = L Lᵀ) to the encoder means; r95 = Mahalanobis radius holding 95% of
  the training latents; decode z = μ̂ + ρ·L·u, u uniform on the unit sphere,
  ρ ~ U[r95, radius_factor·r95] (authors' notebook: 1.5; 1 = the text's ellipsoid surface).

The classifier is trained with cross-entropy, OOD samples weighted ``ood_weight``
(paper: 0.1), Adadelta (paper: lr 0.1 for Fashion-MNIST); OOD score ``n1_prob`` =
p(y = n+1 | x). The same trial can train the paper's baselines on a plain n-class
classifier of the same architecture (``oodlab.methods.classifier_baselines``) and a
confident classifier (Lee et al. 2018a: joint GAN + confidence loss, paper's Eq. 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import jacfwd, jacrev, vmap

from oodlab import data
from oodlab.experiment import ConfigError, Scores, SetInfos, TrialConfig, descend, labels_of, require, score_sets
from oodlab.experiment import Experiment as BaseExperiment
from oodlab.methods import classifier_baselines as cb
from oodlab.models.classifier import Classifier, Discriminator, Generator
from oodlab.models.cvae import CVAE, CVAEConfig

OPTIMIZERS = ("adadelta", "adam", "sgd")
CVAE_OPTIMIZERS = ("rmsprop", "adam")
DIRECTIONS = ("basis_mix", "uniform")
SIGNS = ("random", "positive")
FMNIST_OOD = ("fashion_mnist[labels=5-9]", "mnist", "notmnist", "omniglot", "gaussian_noise", "uniform_noise")


# ---------------------------------------------------------------- Type I: off the manifold

def decoder_jacobian(model: CVAE, z: torch.Tensor, y: torch.Tensor, mode: str = "fwd") -> torch.Tensor:
    """J = ∂g(z, y)/∂z per sample (paper Eq. 1): (B, d) -> (B, D, d), D = C·H·W.

    ``vmap`` over the batch of ``jacfwd`` (d JVPs, cheap when d ≪ D) or ``jacrev`` (D VJPs).
    """
    def g(z1: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:  # (d,), (K,) -> (D,)
        return torch.sigmoid(model.decode_logits(z1[None], c1[None])).flatten()

    jac = jacfwd if mode == "fwd" else jacrev
    return vmap(jac(g), in_dims=(0, 0))(z, model.onehot(y))


def normal_directions(jac: torch.Tensor, generator: torch.Generator | None = None, rtol: float = 1e-6) -> torch.Tensor:
    """Random unit vectors in the left null space of each J (normal bundle): (B, D, d) -> (B, D).

    Thin SVD J = U S Vᵀ; the columns of U with s > rtol·s_max span col(J); an isotropic
    Gaussian r with its col(J) part removed, r − U Uᵀ r, is isotropic in null(Jᵀ), so its
    direction is uniform on that subspace's unit sphere (a random combination of its basis).
    """
    u, s, _ = torch.linalg.svd(jac, full_matrices=False)  # u (B, D, d), s (B, d)
    u = u * (s > rtol * s[:, :1]).unsqueeze(1)  # drop directions of numerical rank deficiency
    r = torch.randn(jac.shape[:2], generator=generator, device=jac.device, dtype=jac.dtype)  # (B, D)
    v = r - (u @ (u.transpose(1, 2) @ r.unsqueeze(-1))).squeeze(-1)
    return v / v.norm(dim=1, keepdim=True)


def rref_pivots(a: torch.Tensor, rtol: float = 1e-7) -> torch.Tensor:
    """Pivot columns of the reduced row-echelon form of each A (B, d, D): (B, d) column indices.

    Column j is a pivot when it is independent of the pivots left of it (residual after
    projecting on their span > rtol·max column norm), the order sympy's ``rref`` picks them in.
    Assumes each A has full row rank d.
    """
    b, d, n = a.shape
    q = torch.zeros(b, d, d, dtype=a.dtype, device=a.device)  # orthonormal basis of the pivots' span
    piv = torch.zeros(b, d, dtype=torch.long, device=a.device)
    count = torch.zeros(b, dtype=torch.long, device=a.device)
    tol = rtol * a.norm(dim=1).amax(1)
    rows = torch.arange(b, device=a.device)
    for j in range(n):
        col = a[:, :, j]
        res = col - (q @ (q.transpose(1, 2) @ col.unsqueeze(-1))).squeeze(-1)
        take = (res.norm(dim=1) > tol) & (count < d)
        if take.any():
            r, k = rows[take], count[take]
            q[r, :, k] = res[take] / res[take].norm(dim=1, keepdim=True)
            piv[r, k] = j
            count = count + take.long()
        if bool((count == d).all()):
            return piv
    raise ValueError(f"a Jacobian has rank < {d}: the null space is not (D − d)-dimensional")


def basis_mix_directions(jac: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The authors' Type I direction: Σ_j w_j n_j / ‖·‖ over the rref null-space basis {n_j} of Jᵀ.

    jac (B, D, d); weights (B, D), used at the D − d free columns (the notebook: U(−1, 1)).
    With A = Jᵀ, pivots P and R = A_P⁻¹ A, sympy's basis vector of free column j is e_j − R_j
    placed at P, unit-normalised: n_j = (e_j − R_j)/s_j, s_j = sqrt(1 + ‖R_j‖²). Summing over j
    without forming the (D − d) × D basis: v = c − scatter_P(R c), c_j = w_j / s_j (0 at P).
    """
    a = jac.transpose(1, 2).double()  # (B, d, D)
    piv = rref_pivots(a)
    r = torch.linalg.solve(torch.gather(a, 2, piv.unsqueeze(1).expand(-1, a.shape[1], -1)), a)  # (B, d, D)
    free = torch.ones_like(weights, dtype=torch.bool).scatter(1, piv, False)
    c = torch.where(free, weights.double() / (1 + r.pow(2).sum(1)).sqrt(), a.new_zeros(()))
    v = c.scatter_add(1, piv, -(r @ c.unsqueeze(-1)).squeeze(-1))
    return (v / v.norm(dim=1, keepdim=True)).to(jac.dtype)


def uniform(n: int, low: float, high: float, generator: torch.Generator | None, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


@dataclass(frozen=True)
class Type1Spec:
    """How Type I samples are drawn (defaults: the authors' notebook; the paper's text in brackets)."""

    beta_low: float = 0.1  # β ~ U[beta_low, beta_high]   [0.1]
    beta_high: float = 28.0  # [1.0]
    direction: str = "basis_mix"  # basis_mix (rref basis, U(−1,1) weights) | uniform (isotropic in the null space)
    sign: str = "random"  # random (±1 per image) | positive
    clip: bool = True  # clip x̃ to [0, 1]   [no]


@torch.no_grad()
def type1(model: CVAE, x: torch.Tensor, y: torch.Tensor, spec: Type1Spec,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """x̃ = x ± β·v(x), v ⟂ tangent space at z = μ(x, y), β ~ U[beta_low, beta_high] (paper Eq. 2)."""
    mu, _ = model.encode(x, y)
    jac = decoder_jacobian(model, mu, y)  # (B, D, d)
    if spec.direction == "uniform":
        v = normal_directions(jac, generator)
    else:
        w = 2 * torch.rand(jac.shape[:2], generator=generator, device=x.device, dtype=jac.dtype) - 1
        v = basis_mix_directions(jac, w)
    beta = uniform(len(x), spec.beta_low, spec.beta_high, generator, x.device)
    if spec.sign == "random":
        beta = beta * (2 * torch.randint(0, 2, (len(x),), generator=generator, device=x.device) - 1)
    xt = x + (beta.unsqueeze(1) * v).view_as(x)
    return xt.clamp(0.0, 1.0) if spec.clip else xt


# ---------------------------------------------------------------- Type II: on the manifold, outside the 95% ellipsoid

@dataclass
class LatentGaussians:
    """Per-class Gaussian fit of the aggregate posterior (paper Eq. 3–4)."""

    mean: torch.Tensor  # (K, d)
    chol: torch.Tensor  # (K, d, d) lower Cholesky factor of Σ̂_c
    r95: torch.Tensor  # (K,) Mahalanobis radius holding `quantile` of class c's training latents


def mahalanobis_radius(z: torch.Tensor, y: torch.Tensor, g: LatentGaussians) -> torch.Tensor:
    """sqrt((z − μ̂_y)ᵀ Σ̂_y⁻¹ (z − μ̂_y)) per sample (B,), via a triangular solve with L_y."""
    w = torch.linalg.solve_triangular(g.chol[y], (z - g.mean[y]).unsqueeze(-1), upper=False)
    return w.squeeze(-1).norm(dim=-1)


def fit_latent_gaussians(mu: torch.Tensor, y: torch.Tensor, n_classes: int, quantile: float = 0.95) -> LatentGaussians:
    """Mean, Cholesky of the covariance and the ``quantile`` Mahalanobis radius of each class's latents."""
    d = mu.shape[1]
    means, chols = [], []
    for c in range(n_classes):  # K classes, each a batched computation
        zc = mu[y == c].double()
        if len(zc) <= d:
            raise ConfigError(f"class {c} has {len(zc)} training images, need more than latent_dim={d} for Type II")
        cov = torch.cov(zc.T) + 1e-6 * torch.eye(d, dtype=zc.dtype, device=zc.device)
        means.append(zc.mean(0))
        chols.append(torch.linalg.cholesky(cov))
    g = LatentGaussians(torch.stack(means).float(), torch.stack(chols).float(), mu.new_zeros(n_classes))
    r = mahalanobis_radius(mu, y, g)
    g.r95 = torch.stack([torch.quantile(r[y == c], quantile) for c in range(n_classes)])
    return g


def sphere(n: int, d: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """Uniform points on the unit sphere in R^d (normalized Gaussians)."""
    u = torch.randn(n, d, generator=generator, device=device)
    return u / u.norm(dim=1, keepdim=True)


def type2_latents(g: LatentGaussians, y: torch.Tensor, radius_factor: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """z = μ̂_y + ρ·L_y·u with u on the unit sphere, ρ ~ U[r95_y, radius_factor·r95_y] (Rubinstein 1982)."""
    u = sphere(len(y), g.mean.shape[1], generator, y.device)
    rho = g.r95[y] * uniform(len(y), 1.0, radius_factor, generator, y.device)
    return g.mean[y] + (g.chol[y] @ (rho.unsqueeze(1) * u).unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def type2(model: CVAE, g: LatentGaussians, y: torch.Tensor, radius_factor: float,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Decoded Type II samples g(z, y), (B, C, H, W)."""
    return model.decode(type2_latents(g, y, radius_factor, generator), y)


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
    # --- CVAE (defaults: the authors' notebook; text = the layers used before it was read) ---
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
    ood_weight: float = 0.1  # weight of the OOD class in the cross-entropy (paper: 0.1)
    optimizer: str = "adadelta"  # classifier optimizer: adadelta | adam | sgd
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
            (self.ood_weight >= 0, f"ood_weight must be >= 0, got {self.ood_weight}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}"),
            (self.odin_temperature > 0, f"odin_temperature must be > 0, got {self.odin_temperature}"),
            (self.odin_eps >= 0 and self.maha_eps >= 0, "odin_eps and maha_eps must be >= 0"),
            (self.mc_samples >= 1, f"mc_samples must be >= 1, got {self.mc_samples}"),
            (self.conf_beta >= 0, f"conf_beta must be >= 0, got {self.conf_beta}"),
            (0 < self.gan_lr < 1, f"gan_lr must be in (0, 1), got {self.gan_lr}"),
        ])

    def cvae_config(self, shape: tuple[int, int, int], n_classes: int) -> CVAEConfig:
        """The CVAE for ID images of this (C, H, W) and n classes; ConfigError when it does not fit them."""
        c, h, w = shape
        if h != w or h % 4:  # the classifiers pool twice by 2
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


def _optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


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
        self.clf = {"n1": Classifier(self.n + 1, c, h).to(self.device)}
        if cfg.baselines:
            self.clf["plain"] = Classifier(self.n, c, h).to(self.device)
            self.clf["conf"] = Classifier(self.n, c, h).to(self.device)
            self.gan_g, self.gan_d = Generator(channels=c, size=h).to(self.device), Discriminator(c, h).to(self.device)
            self.g_opt = torch.optim.Adam(self.gan_g.parameters(), lr=cfg.gan_lr, betas=(0.5, 0.999))
            self.d_opt = torch.optim.Adam(self.gan_d.parameters(), lr=cfg.gan_lr, betas=(0.5, 0.999))
        self.opt = {k: _optimizer(cfg.optimizer, m.parameters(), cfg.lr) for k, m in self.clf.items()}
        self.latents: LatentGaussians | None = None
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)  # batch order, OOD draws

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
        for m in self.clf.values():
            m.train()

        def step(idx: torch.Tensor) -> dict[str, float]:
            x, y = data.to_float(self.train_x[idx]), self.train_y[idx]
            x_ood, _ = self.generate(max(1, round(cfg.ood_ratio * len(idx))))
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
        """ID test accuracy of each classifier; the (n+1) classifier predicts among the n ID classes."""
        x, bs = self.test["id"].x, self.cfg.eval_batch_size
        out = {}
        for k, m in self.clf.items():
            m.eval()
            pred = torch.cat([m(data.to_float(x[i : i + bs]))[:, : self.n].argmax(1) for i in range(0, len(x), bs)])
            out[f"acc_{k}"] = (pred == self.test_y).float().mean().item()
        return out

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
                             "epoch": self.epoch, "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state()}
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
        torch.set_rng_state(state["torch_rng"])
