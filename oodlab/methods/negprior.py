"""Negative-prior VAE training (Csiszárik et al., paper 000, §III-A).

Inliers x maximise the ELBO under the standard prior p(z) = N(0, I); negatives x̄ have
their approximate posterior pushed towards the negative prior p̄(z) = N(shift·1, I):

    L_np = E_x[ −ELBO(x) ] + w · E_x̄[ KL( q(z|x̄) || p̄(z) ) ]

The added term is non-negative, so L_np still upper-bounds the inliers' NLL; it trains
the encoder to separate inliers and outliers in latent space. ``w`` is ``neg_weight``.
With ``x_neg=None`` (no negatives) this is the plain VAE baseline.
"""

from __future__ import annotations

import torch

from oodlab.models.vae import VAE
from oodlab.priors import kl_to_normal
from oodlab.scores import elbo_terms

NEGATIVES = ("none", "aux")


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
