"""The VAE probability pieces, one home each: diagonal-Gaussian posteriors, their KL to a
unit-variance Gaussian prior, the reparameterisation step, IWAE log-weights and bits/dim.

Every model and method calls these rather than writing the formula again, so a fix or a
change of convention (the log-variance clamp, say) happens in one place. Shapes: latents
are (..., D) and every density or KL is summed over the last dimension.
"""

from __future__ import annotations

import math

import torch

# log σ² is clamped to this range on every encoder's output: σ² in [1e-13, 5e8] keeps exp()
# and the KL finite in float32 when a run drifts, and never binds in a healthy one.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
LOG_2PI = math.log(2 * math.pi)


def clamp_logvar(logvar: torch.Tensor) -> torch.Tensor:
    return logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


def gaussian_stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An encoder head's output (..., 2D) split into (μ, clamped log σ²), each (..., D)."""
    mu, logvar = h.chunk(2, dim=-1)
    return mu, clamp_logvar(logvar)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None,
                   eps: torch.Tensor | None = None) -> torch.Tensor:
    """z = μ + ε·σ with ε ~ N(0, I) drawn from ``generator``, or the given ``eps`` (broadcast)."""
    if eps is None:
        eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
    return mu + eps * (0.5 * logvar).exp()


def kl_to_normal(mu: torch.Tensor, logvar: torch.Tensor, mean: float | torch.Tensor = 0.0) -> torch.Tensor:
    """KL( N(μ, diag σ²) || N(m, I) ) summed over the last dim: ½ Σ_j [σ_j² + (μ_j − m_j)² − 1 − log σ_j²].

    ``mean`` is 0 for the standard prior, a scalar shift for paper 000's negative prior
    N(shift·1, I), or a (..., D) tensor of component means for the mixture priors.
    """
    return 0.5 * (logvar.exp() + (mu - mean).pow(2) - 1.0 - logvar).sum(dim=-1)


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; μ, diag σ²) summed over the last dim."""
    return -0.5 * (logvar + (z - mu).pow(2) / logvar.exp() + LOG_2PI).sum(-1)


def log_std_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dim."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)


def sample_k(mu: torch.Tensor, logvar: torch.Tensor, k: int, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k posterior draws per row folded into the batch, so one decoder call serves all:
    (z, μ, log σ²), each (B·k, D); rows i·k … i·k+k−1 belong to row i (view(B, k) regroups)."""
    mu_k, logvar_k = mu.repeat_interleave(k, 0), logvar.repeat_interleave(k, 0)
    return reparameterize(mu_k, logvar_k, generator), mu_k, logvar_k


def iwae_log_weights(log_px: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                     log_pz: torch.Tensor | None = None) -> torch.Tensor:
    """log w = log p(x|z) + log p(z) − log q(z|x) for samples z ~ q(z|x) = N(μ, diag σ²);
    p(z) = N(0, I) unless ``log_pz`` gives another prior's log-density at z."""
    return log_px + (log_std_normal(z) if log_pz is None else log_pz) - log_normal(z, mu, logvar)


def log_mean_exp(log_w: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log (1/k Σ_i exp(log w_i)) over ``dim`` (k = its size): the IWAE bound from its log-weights."""
    return torch.logsumexp(log_w, dim=dim) - math.log(log_w.shape[dim])


def bits_per_dim(nats: torch.Tensor, dims: int) -> torch.Tensor:
    """A code length or negative log-likelihood in nats of a D-dimensional input, in bits per dimension."""
    return nats / (dims * math.log(2.0))


def to_bpd(log_likelihood: torch.Tensor, dims: int) -> torch.Tensor:
    """Bits per dimension of a log-likelihood in nats (−log p / (D ln 2)): higher = less likely."""
    return bits_per_dim(-log_likelihood, dims)
