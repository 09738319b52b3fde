"""Untrainable mixture priors of Kamoi & Kobayashi (papers 001/003, §4), exact and vectorized.

    p(z) = (1/K) Σ_i p_i(z),   p_i(z) = Π_j g(z_j − m_ij)

with unit-variance components g of one family:

* ``gaussian``      g = N(0, 1)
* ``gen_gaussian``  g(x) = β / (2α Γ(1/β)) · exp(−(|x|/α)^β),  α = √(Γ(1/β)/Γ(3/β))   (Eq. 3)
                    so that Var = 1 for every β (β = 2 is N(0, 1); the paper uses β = 4).

Component means (paper §5.3–5.4): one component at 0 (the standard prior); two at
±d/2·e_1 (so d is the distance between them); K > 2 either at d·e_i, i = 1..K (``layout="axes"``,
the paper's quad-modal VAE: 150·e_i) or on one line at [d·i, 0, …], i = 0..K−1
(``layout="line"``, the paper's quad-modal Glow: 200·i, §5.4, "placing modes on differing
dimensions does not work on Glow"). Training pulls each image to its assigned component p_i;
test likelihoods use the full mixture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from oodlab.vae_math import kl_to_normal, log_normal

FAMILIES = ("gaussian", "gen_gaussian")


LAYOUTS = ("axes", "line")


def check_components(components: int, dim: int, layout: str = "axes") -> None:
    """ValueError unless K components fit a D-dim latent: K >= 1, a known layout, and D >= K when
    K > 2 with the means on the axes (d·e_i)."""
    if components < 1:
        raise ValueError(f"components must be >= 1, got {components}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if components > 2 and layout == "axes" and components > dim:
        raise ValueError(f"{components} components at d·e_i need latent_dim >= {components}, got {dim}")


def component_means(components: int, distance: float, dim: int, layout: str = "axes") -> torch.Tensor:
    """(K, D) means: 0 for K = 1; ±d/2 on axis 0 for K = 2; for K > 2 d·e_i (``axes``, needs D ≥ K)
    or d·i·e_1, i = 0..K−1 (``line``)."""
    check_components(components, dim, layout)
    means = torch.zeros(components, dim, dtype=torch.float64)
    if components > 2 and layout == "line":
        means[:, 0] = distance * torch.arange(components, dtype=torch.float64)
    elif components == 2:
        means[:, 0] = torch.tensor([-distance / 2, distance / 2], dtype=torch.float64)
    elif components > 2:
        means[torch.arange(components), torch.arange(components)] = distance
    return means


def gen_gaussian_alpha(beta: float) -> float:
    """Scale α giving the generalized Gaussian unit variance: α = √(Γ(1/β) / Γ(3/β))."""
    return math.exp(0.5 * (math.lgamma(1 / beta) - math.lgamma(3 / beta)))


def log_density_1d(x: torch.Tensor, family: str, beta: float = 2.0) -> torch.Tensor:
    """Elementwise log g(x) of the unit-variance, zero-mean family (no reduction)."""
    if family == "gaussian":
        return -0.5 * x.pow(2) - 0.5 * math.log(2 * math.pi)
    if family == "gen_gaussian":
        alpha = gen_gaussian_alpha(beta)
        log_norm = math.log(beta) - math.log(2 * alpha) - math.lgamma(1 / beta)
        return log_norm - (x.abs() / alpha).pow(beta)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


@dataclass(frozen=True)
class MixturePrior:
    """Uniform-weight mixture of K unit-variance product components; means (K, D)."""

    means: torch.Tensor  # (K, D)
    family: str = "gaussian"  # "gaussian" | "gen_gaussian"
    beta: float = 2.0  # shape of gen_gaussian (paper: 4); ignored for gaussian

    @classmethod
    def build(cls, family: str, components: int, distance: float, dim: int, beta: float = 4.0,
              device: torch.device | str = "cpu", layout: str = "axes") -> MixturePrior:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        means = component_means(components, distance, dim, layout).to(device=device, dtype=torch.float32)
        return cls(means, family, beta)

    @property
    def components(self) -> int:
        return self.means.shape[0]

    def to(self, device: torch.device | str) -> MixturePrior:
        return MixturePrior(self.means.to(device), self.family, self.beta)

    def log_prob_components(self, z: torch.Tensor) -> torch.Tensor:
        """log p_i(z) for every component: z (..., D) -> (..., K)."""
        return log_density_1d(z.unsqueeze(-2) - self.means, self.family, self.beta).sum(-1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) = logsumexp_i log p_i(z) − log K: z (..., D) -> (...)."""
        return torch.logsumexp(self.log_prob_components(z), dim=-1) - math.log(self.components)

    def log_prob_assigned(self, z: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
        """log p_{c}(z) of each row's own component: z (B, D), comp (B,) long -> (B,)."""
        return log_density_1d(z - self.means[comp], self.family, self.beta).sum(-1)

    def kl_assigned(self, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || p_c) per row (B,): closed form for Gaussian components, else the
        one-sample estimate log q(z|x) − log p_c(z) at the reparameterized z."""
        if self.family == "gaussian":
            return kl_to_normal(mu, logvar, self.means[comp])
        return log_normal(z, mu, logvar) - self.log_prob_assigned(z, comp)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the component with the highest density at z: (B, D) -> (B,)."""
        return self.log_prob_components(z).argmax(-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws (n, D): a uniform component, then independent coordinates around its mean.

        Generalized Gaussian: |x|/α = G^{1/β} with G ~ Gamma(1/β, 1), times a random sign.
        """
        k, d = self.means.shape
        dev = self.means.device
        comp = torch.randint(k, (n,), generator=generator, device=dev)
        if self.family == "gaussian":
            eps = torch.randn(n, d, generator=generator, device=dev)
        else:
            u = torch.rand(n, d, generator=generator, device=dev, dtype=torch.float64)
            g = _gamma_icdf(u, 1 / self.beta)
            sign = torch.randint(2, (n, d), generator=generator, device=dev) * 2 - 1
            eps = (sign * gen_gaussian_alpha(self.beta) * g.pow(1 / self.beta)).float()
        return self.means[comp] + eps


def _gamma_icdf(u: torch.Tensor, a: float) -> torch.Tensor:
    """Inverse CDF of Gamma(a, 1) (scipy; only used for sampling, not on any gradient path)."""
    from scipy.special import gammaincinv

    return torch.from_numpy(gammaincinv(a, u.cpu().numpy())).to(u.device)

