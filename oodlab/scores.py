"""Model-agnostic OOD scores of a VAE: pure functions of (model, x), higher = more OOD.

* ``elbo_terms``  — per-sample reconstruction log-likelihood and KL(q(z|x) || N(0, I)).
* ``bpd``         — BPD(x) = −ELBO(x) / (D · ln 2), paper 000's "AUC-BPD" score.
* ``kl``          — KL(q(z|x) || p(z)), paper 000's "AUC-KL" score.
* ``iwae_bpd``    — −log (1/k Σ_i p(x, z_i) / q(z_i|x)) / (D · ln 2), a tighter bound.

For the Bernoulli decoder on grey-level pixels (the paper's setting), −ELBO is not a
proper discrete likelihood; it is what the paper scores, so we keep it.
"""

from __future__ import annotations

import torch

from oodlab.models.vae import VAE
from oodlab.vae_math import iwae_log_weights, kl_to_normal, log_mean_exp, reparameterize, sample_k, to_bpd


def elbo_terms(model: VAE, x: torch.Tensor, generator: torch.Generator | None = None,
               eps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One-sample ELBO pieces, each (B,): ``rec`` = log p(x|z), ``kl``, ``elbo`` = rec − kl; plus μ, log σ².
    The draw z = μ + ε·σ takes ε from ``eps`` when given (replicates draw it from their own stream)."""
    mu, logvar = model.encode(x)
    z = reparameterize(mu, logvar, generator, eps)
    rec = model.log_px(x, model.decode(z))
    kl = kl_to_normal(mu, logvar)
    return {"rec": rec, "kl": kl, "elbo": rec - kl, "mu": mu, "logvar": logvar}


def iwae_log_likelihood(model: VAE, x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """IWAE bound log (1/k Σ_i w_i), w_i = p(x|z_i) p(z_i) / q(z_i|x), z_i ~ q(z|x); (B,).

    The k samples are folded into the batch (B·k rows) so one decoder call serves all.
    """
    mu, logvar = model.encode(x)
    z, mu_k, logvar_k = sample_k(mu, logvar, k, generator)
    log_w = iwae_log_weights(model.log_px(x.repeat_interleave(k, 0), model.decode(z)), z, mu_k, logvar_k)
    return log_mean_exp(log_w.view(len(x), k), dim=1)


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
