"""Conditional VAE of paper 002 (Vernekar et al.), returning per-sample quantities.

Encoder q(z|x, y): two 4×4 stride-2 convolutions (32, 64 filters, ReLU), the flattened
features concatenated with the one-hot label, a 256-unit dense layer, then (μ, log σ²).
Decoder p(x|z, y): [z, one-hot y] -> 256 -> 64×(S/4)² dense layers, two 4×4 stride-2
transposed convolutions (32, C filters) giving Bernoulli logits; the decoder mean
g(z, y) = sigmoid(logits) is the manifold map of the paper's Eq. (1). The paper's
Figure 6 (the exact layer sizes) is an image not in the text; this follows its shape
(conv encoder, label concatenated after the convolutions, mirrored decoder).

Objective (paper §3.1, standard CVAE): ELBO(x, y) = E_q[log p(x|z, y)] − KL(q(z|x, y) || N(0, I)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from oodlab.models import likelihoods
from oodlab.priors import kl_to_normal


@dataclass(frozen=True)
class CVAEConfig:
    n_classes: int = 5  # number of ID classes (one-hot condition)
    channels: int = 1
    size: int = 28  # input height = width (divisible by 4)
    latent_dim: int = 10  # paper 002: 8 for MNIST, 10 for Fashion-MNIST
    hidden: int = 256  # dense layer width

    def __post_init__(self) -> None:
        if self.n_classes < 1 or self.latent_dim < 1 or self.hidden < 1:
            raise ValueError(f"n_classes, latent_dim and hidden must be >= 1, got {self}")
        if self.size % 4:
            raise ValueError(f"the CVAE needs a size divisible by 4, got {self.size}")


class CVAE(nn.Module):
    def __init__(self, cfg: CVAEConfig):
        super().__init__()
        self.cfg = cfg
        c, s, k, d, h = cfg.channels, cfg.size, cfg.n_classes, cfg.latent_dim, cfg.hidden
        feat = 64 * (s // 4) ** 2
        self.conv = nn.Sequential(
            nn.Conv2d(c, 32, 4, 2, 1), nn.ReLU(),  # (B, 32, S/2, S/2)
            nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),  # (B, 64, S/4, S/4)
            nn.Flatten(),
        )
        self.enc = nn.Sequential(nn.Linear(feat + k, h), nn.ReLU(), nn.Linear(h, 2 * d))  # -> (μ, log σ²)
        self.dec = nn.Sequential(
            nn.Linear(d + k, h), nn.ReLU(), nn.Linear(h, feat), nn.ReLU(),
            nn.Unflatten(1, (64, s // 4, s // 4)),
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),  # (B, 32, S/2, S/2)
            nn.ConvTranspose2d(32, c, 4, 2, 1),  # logits (B, C, S, S)
        )

    def onehot(self, y: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, self.cfg.n_classes).to(torch.float32)

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [0,1], y (B,) int -> μ, log σ² each (B, d)."""
        mu, logvar = self.enc(torch.cat([self.conv(x), self.onehot(y)], 1)).chunk(2, dim=-1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode_logits(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """z (B, d), c (B, n_classes) one-hot -> logits (B, C, H, W)."""
        return self.dec(torch.cat([z, c], 1))

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Decoder mean g(z, y) in [0,1]: (B, C, H, W)."""
        return torch.sigmoid(self.decode_logits(z, self.onehot(y)))

    def elbo_terms(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One-sample ELBO pieces, each (B,): ``rec`` = log p(x|z, y), ``kl``, ``elbo``."""
        mu, logvar = self.encode(x, y)
        eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
        z = mu + eps * (0.5 * logvar).exp()
        rec = likelihoods.bernoulli(x, self.decode_logits(z, self.onehot(y)))
        kl = kl_to_normal(mu, logvar)
        return {"rec": rec, "kl": kl, "elbo": rec - kl}
