"""Model-agnostic OOD scores of a VAE: pure functions of (model, x), higher = more OOD.

* ``elbo_terms``  — per-sample reconstruction log-likelihood and KL(q(z|x) || N(0, I)).
* ``bpd``         — BPD(x) = −ELBO(x) / (D · ln 2), paper 000's "AUC-BPD" score.
* ``kl``          — KL(q(z|x) || p(z)), paper 000's "AUC-KL" score.
* ``iwae_bpd``    — −log (1/k Σ_i p(x, z_i) / q(z_i|x)) / (D · ln 2), a tighter bound.

For the Bernoulli decoder on grey-level pixels (the paper's setting), −ELBO is not a
proper discrete likelihood; it is what the paper scores, so we keep it.
"""

from __future__ import annotations

import math

import torch

from oodlab.models.vae import VAE
from oodlab.priors import kl_to_normal, log_normal

SCORES = ("bpd", "kl", "iwae")


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
    return mu + eps * (0.5 * logvar).exp()


def elbo_terms(model: VAE, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One-sample ELBO pieces, each (B,): ``rec`` = log p(x|z), ``kl``, ``elbo`` = rec − kl; plus μ, log σ²."""
    mu, logvar = model.encode(x)
    z = reparameterize(mu, logvar, generator)
    rec = model.log_px(x, model.decode(z))
    kl = kl_to_normal(mu, logvar)
    return {"rec": rec, "kl": kl, "elbo": rec - kl, "mu": mu, "logvar": logvar}


def to_bpd(log_likelihood: torch.Tensor, dims: int) -> torch.Tensor:
    """Bits per dimension of a log-likelihood (in nats) of a D-dimensional input."""
    return -log_likelihood / (dims * math.log(2.0))


def iwae_log_likelihood(model: VAE, x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """IWAE bound log (1/k Σ_i w_i), w_i = p(x|z_i) p(z_i) / q(z_i|x), z_i ~ q(z|x); (B,).

    The k samples are folded into the batch (B·k rows) so one decoder call serves all.
    """
    mu, logvar = model.encode(x)
    b, d = mu.shape
    mu_k, logvar_k = mu.repeat_interleave(k, 0), logvar.repeat_interleave(k, 0)  # (B·k, D)
    z = reparameterize(mu_k, logvar_k, generator)
    x_k = x.repeat_interleave(k, 0)
    zeros = torch.zeros_like(z)
    log_w = model.log_px(x_k, model.decode(z)) + log_normal(z, zeros, zeros) - log_normal(z, mu_k, logvar_k)
    return torch.logsumexp(log_w.view(b, k), dim=1) - math.log(k)


@torch.no_grad()
def score_batch(
    model: VAE, x: torch.Tensor, iwae_k: int = 0, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """All scores for one batch of [0,1] images, each (B,), higher = more OOD."""
    t = elbo_terms(model, x, generator)
    out = {"bpd": to_bpd(t["elbo"], model.dims), "kl": t["kl"]}
    if iwae_k > 0:
        out["iwae"] = to_bpd(iwae_log_likelihood(model, x, iwae_k, generator), model.dims)
    return out
