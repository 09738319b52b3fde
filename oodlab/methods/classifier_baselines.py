"""Classifier-based OOD detectors that paper 002 compares against; higher score = more OOD.

Pure functions of (model, x) plus thin fitted wrappers:

* ``msp``             max-softmax (Hendrycks & Gimpel 2016): s(x) = −max_k softmax(f(x))_k.
* ``odin``            ODIN (Liang et al. 2018): x̃ = x − ε·sign(−∇_x log max_k softmax(f(x)/T)_k),
                      s(x) = −max_k softmax(f(x̃)/T)_k.
* ``mahalanobis``     Lee et al. 2018b without feature ensemble: class means μ_c and one tied
                      covariance Σ of the penultimate features φ(x); M(x) = min_c (φ−μ_c)ᵀ Σ⁻¹ (φ−μ_c);
                      optional preprocessing x̃ = x − ε·sign(∇_x M(x)); s(x) = M(x̃).
* ``mc_dropout``      Gal & Ghahramani 2016: p̄ = mean over T dropout passes, s(x) = −max_k p̄_k;
                      ``mutual_info`` = H(p̄) − mean_t H(p_t) (Gal et al. 2017, paper 002 Table 2).
* ``kl_to_uniform``   KL(U(y) || p_θ(y|x)), the confidence-loss term of Lee et al. 2018a (Eq. 5 (b)).

Input gradients are taken on the batch sum: with the model in eval mode (no batch norm)
each sample's output depends only on its own input, so the sum's gradient is exactly
the stack of per-sample gradients, in one backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from oodlab.models.classifier import Classifier


class FeatureModel(Protocol):
    """A classifier whose penultimate activations Mahalanobis scores are computed on."""

    def features(self, x: torch.Tensor) -> torch.Tensor: ...


class NotFittedError(RuntimeError):
    """A detector that needs ``fit`` was used before it."""


def msp(logits: torch.Tensor) -> torch.Tensor:
    """−max softmax probability, (B, K) -> (B,)."""
    return -logits.softmax(-1).amax(-1)


def input_gradient(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """∇_x of a per-sample scalar function ``fn: (B, ...) -> (B,)``, per sample, via one backward of the sum."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(x).sum(), x)
    return g


def odin_preprocess(model: nn.Module, x: torch.Tensor, temperature: float, eps: float) -> torch.Tensor:
    """x̃ = x − ε·sign(∇_x [−log max_k softmax(f(x)/T)_k]): the step that raises the top softmax score."""
    if eps == 0:
        return x
    g = input_gradient(lambda v: -(model(v) / temperature).log_softmax(-1).amax(-1), x)
    return x - eps * g.sign()


def odin(model: nn.Module, x: torch.Tensor, temperature: float = 1000.0, eps: float = 0.0014) -> torch.Tensor:
    """ODIN score (B,): −max softmax of the temperature-scaled logits at the preprocessed input."""
    with torch.no_grad():
        return -(model(odin_preprocess(model, x, temperature, eps)) / temperature).softmax(-1).amax(-1)


@dataclass
class Gaussian:
    """Class means (K, F) and the lower Cholesky factor (F, F) of the tied covariance."""

    means: torch.Tensor
    chol: torch.Tensor


def fit_tied_gaussian(features: torch.Tensor, labels: torch.Tensor, n_classes: int, ridge: float = 1e-6) -> Gaussian:
    """μ_c = mean of class c; Σ = (1/N) Σ_c Σ_{i∈c} (φ_i − μ_c)(φ_i − μ_c)ᵀ (+ ridge·tr(Σ)/F·I); Cholesky of Σ."""
    f = features.double()
    onehot = F.one_hot(labels, n_classes).double()  # (N, K)
    means = (onehot.T @ f) / onehot.sum(0).clamp(min=1).unsqueeze(1)  # (K, F)
    centred = f - means[labels]
    cov = centred.T @ centred / len(f)
    cov = cov + ridge * cov.diagonal().mean().clamp(min=1e-12) * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
    return Gaussian(means.to(features.dtype), torch.linalg.cholesky(cov).to(features.dtype))


def mahalanobis_sq(features: torch.Tensor, g: Gaussian) -> torch.Tensor:
    """(φ − μ_c)ᵀ Σ⁻¹ (φ − μ_c) for every class: (B, F) -> (B, K), via L⁻¹ with Σ = L Lᵀ."""
    diff = features.unsqueeze(1) - g.means  # (B, K, F)
    w = torch.linalg.solve_triangular(g.chol, diff.reshape(-1, diff.shape[-1]).T, upper=False)  # (F, B·K)
    return w.pow(2).sum(0).view(diff.shape[:2])


def mahalanobis(model: FeatureModel, x: torch.Tensor, g: Gaussian, eps: float = 0.0) -> torch.Tensor:
    """Min-over-classes Mahalanobis distance² of the penultimate features (B,), after optional preprocessing."""
    dist = lambda v: mahalanobis_sq(model.features(v), g).amin(-1)
    if eps > 0:
        x = x - eps * input_gradient(dist, x).sign()
    with torch.no_grad():
        return dist(x)


class MahalanobisDetector:
    """Thin wrapper: ``fit(model, x, y, n_classes)`` then ``detector(model, x)`` -> (B,) scores."""

    def __init__(self, eps: float = 0.0):
        self.eps = eps
        self.g: Gaussian | None = None

    @torch.no_grad()
    def fit(self, model: FeatureModel, x: torch.Tensor, y: torch.Tensor, n_classes: int,
            batch_size: int = 1000) -> MahalanobisDetector:
        feats = torch.cat([model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
        self.g = fit_tied_gaussian(feats, y, n_classes)
        return self

    def __call__(self, model: FeatureModel, x: torch.Tensor) -> torch.Tensor:
        if self.g is None:
            raise NotFittedError("MahalanobisDetector.fit must run before scoring")
        return mahalanobis(model, x, self.g, self.eps)


def _dropout_only(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.train(on)


@torch.no_grad()
def mc_dropout_probs(model: nn.Module, x: torch.Tensor, t: int) -> torch.Tensor:
    """Softmax outputs of t dropout passes, (t, B, K), as one batch of t·B rows.

    A ``Classifier`` (dropout only in the tail, ``model(x) = tail(trunk(x))``) runs its trunk
    once; any other model runs whole t times.
    """
    model.eval()
    _dropout_only(model, True)
    try:
        if isinstance(model, Classifier):
            h = model.trunk(x)
            logits = model.tail(h.repeat(t, *[1] * (h.ndim - 1)))  # (t·B, K)
        else:
            logits = model(x.repeat(t, *[1] * (x.ndim - 1)))
    finally:
        _dropout_only(model, False)
    return logits.softmax(-1).view(t, len(x), -1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp(min=1e-12).log()).sum(-1)


def mc_dropout(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """From (t, B, K) dropout softmaxes: ``mc_dropout`` = −max_k p̄_k and ``mutual_info`` = H(p̄) − E_t H(p_t)."""
    mean = probs.mean(0)
    return {"mc_dropout": -mean.amax(-1), "mutual_info": entropy(mean) - entropy(probs).mean(0)}


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(U || softmax(logits)) = −log K − (1/K) Σ_k log p_k, per sample (B,)."""
    return -math.log(logits.shape[-1]) - logits.log_softmax(-1).mean(-1)
