"""Paper 002's generated OOD samples (Vernekar et al.): the geometry, as pure functions of a CVAE.

* Type I (§3.1, Eq. 1–2): off the manifold. J(x) = ∂g(z, y)/∂z at z = μ(x, y) spans the
  tangent space; a unit vector v in the left null space of J (normal bundle) moves the image
  off it: x̃ = x ± β·v. ``Type1Spec``'s defaults follow the authors' notebook (sverneka/OODGen):
  v mixes the rref null-space basis of Jᵀ (sympy ``Matrix.nullspace``, each vector
  unit-normalised) with U(−1, 1) weights, β ~ U[0.1, 28], a random sign, x̃ clipped to [0, 1].
  The paper's text (``direction="uniform"``, β ~ U[0.1, 1], ``sign="positive"``, ``clip=False``)
  is an option.
* Type II (§3.2, Eq. 3–4): on the manifold, beyond the ID boundary. Per class, fit a Gaussian
  (μ̂, Σ̂ = L Lᵀ) to the encoder means; r95 = Mahalanobis radius holding 95% of the training
  latents; decode z = μ̂ + ρ·L·u, u uniform on the unit sphere, ρ ~ U[r95, radius_factor·r95]
  (authors' notebook: 1.5; 1 = the text's ellipsoid surface).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import jacfwd, jacrev, vmap

from oodlab.experiment import ConfigError
from oodlab.models.cvae import CVAE

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


def uniform(n: int, low: float, high: float, generator: torch.Generator | None,
            device: torch.device | str) -> torch.Tensor:
    """n draws of U[low, high]."""
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


def sphere(n: int, d: int, generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
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
