"""Latent priors and their closed-form KL terms.

The negative-prior method (Csiszárik et al., paper 000) needs two priors: the standard
normal p(z) = N(0, I) for inliers and a shifted "negative" prior p̄(z) = N(shift·1, I)
for negatives. Both are unit-variance Gaussians, so one KL formula serves both.
"""

from __future__ import annotations

import torch


def kl_to_normal(mu: torch.Tensor, logvar: torch.Tensor, mean: float = 0.0) -> torch.Tensor:
    """KL( N(mu, diag(exp(logvar))) || N(mean·1, I) ), summed over latents, per sample.

    KL = ½ Σ_j [ σ_j² + (μ_j − m)² − 1 − log σ_j² ]            (B, D) -> (B,)
    """
    return 0.5 * (logvar.exp() + (mu - mean).pow(2) - 1.0 - logvar).sum(dim=-1)


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))), summed over the last dimension."""
    return -0.5 * (logvar + (z - mu).pow(2) / logvar.exp() + torch.log(torch.tensor(2 * torch.pi))).sum(-1)
