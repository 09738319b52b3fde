"""Conditional VAE of paper 002 (Vernekar et al.), returning per-sample quantities.

Two layer sets (``CVAEConfig.arch``):

* ``authors`` (default) — the authors' released notebook (sverneka/OODGen,
  ``fmnist_0_4/cvae_generic_batchwise_mahalanobis.ipynb``, Keras): encoder two 3×3 stride-2
  'same' convolutions (32, 64 filters, ReLU), flattened features concatenated with the one-hot
  label, Dense(16, ReLU), separate dense μ and log σ² heads; decoder [z, one-hot] ->
  Dense(64·(S/4)², ReLU) -> two 3×3 stride-2 transposed convolutions (64, 32 filters, ReLU) ->
  3×3 stride-1 transposed convolution (C filters) giving Bernoulli logits. (The notebook also
  builds a Dense(16) from the decoder input but overwrites its output, so it is not used.)
* ``text`` — a reading of the paper's text alone (its Figure 6 is an image absent from the
  text): two 4×4 stride-2 convolutions (32, 64), Dense(``hidden``), fused (μ, log σ²) head;
  decoder Dense(hidden) -> Dense(64·(S/4)²) -> two 4×4 stride-2 transposed convs.

The decoder mean g(z, y) = sigmoid(logits) is the manifold map of the paper's Eq. (1).
Objective (paper §3.1, standard CVAE): ELBO(x, y) = E_q[log p(x|z, y)] − KL(q(z|x, y) || N(0, I)).
The notebook's ``sampling`` returns z = μ, so the authors train with the reconstruction of μ
(``sample=False`` here) while the KL term still sees log σ².
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from oodlab.models import likelihoods
from oodlab.vae_math import clamp_logvar, kl_to_normal, reparameterize

ARCHS = ("authors", "text")


@dataclass(frozen=True)
class CVAEConfig:
    n_classes: int = 5  # number of ID classes (one-hot condition)
    channels: int = 1
    size: int = 28  # input height = width (divisible by 4)
    latent_dim: int = 10  # paper 002: 8 for MNIST, 10 for Fashion-MNIST
    arch: str = "authors"  # authors | text (see the module docstring)
    hidden: int = 0  # encoder dense width; 0 = the arch's own (authors 16, text 256)

    def __post_init__(self) -> None:
        if self.n_classes < 1 or self.latent_dim < 1 or self.hidden < 0:
            raise ValueError(f"n_classes, latent_dim must be >= 1 and hidden >= 0, got {self}")
        if self.size % 4:
            raise ValueError(f"the CVAE needs a size divisible by 4, got {self.size}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")

    @property
    def width(self) -> int:
        return self.hidden or (16 if self.arch == "authors" else 256)


Layers = tuple[nn.Sequential, nn.Sequential, nn.ModuleList, nn.Sequential]  # conv, dense, heads, decoder


def _authors_layers(c: int, s: int, k: int, d: int, h: int) -> Layers:
    feat = 64 * (s // 4) ** 2
    conv = nn.Sequential(nn.Conv2d(c, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(), nn.Flatten())
    enc = nn.Sequential(nn.Linear(feat + k, h), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(h, d), nn.Linear(h, d)])  # μ, log σ²
    dec = nn.Sequential(
        nn.Linear(d + k, feat), nn.ReLU(), nn.Unflatten(1, (64, s // 4, s // 4)),
        nn.ConvTranspose2d(64, 64, 3, 2, 1, output_padding=1), nn.ReLU(),  # (B, 64, S/2, S/2)
        nn.ConvTranspose2d(64, 32, 3, 2, 1, output_padding=1), nn.ReLU(),  # (B, 32, S, S)
        nn.ConvTranspose2d(32, c, 3, 1, 1),  # logits (B, C, S, S)
    )
    return conv, enc, heads, dec


def _text_layers(c: int, s: int, k: int, d: int, h: int) -> Layers:
    feat = 64 * (s // 4) ** 2
    conv = nn.Sequential(nn.Conv2d(c, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(), nn.Flatten())
    enc = nn.Sequential(nn.Linear(feat + k, h), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(h, 2 * d)])  # fused (μ, log σ²)
    dec = nn.Sequential(
        nn.Linear(d + k, h), nn.ReLU(), nn.Linear(h, feat), nn.ReLU(), nn.Unflatten(1, (64, s // 4, s // 4)),
        nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),  # (B, 32, S/2, S/2)
        nn.ConvTranspose2d(32, c, 4, 2, 1),  # logits (B, C, S, S)
    )
    return conv, enc, heads, dec


class CVAE(nn.Module):
    def __init__(self, cfg: CVAEConfig):
        super().__init__()
        self.cfg = cfg
        layers = _authors_layers if cfg.arch == "authors" else _text_layers
        parts = layers(cfg.channels, cfg.size, cfg.n_classes, cfg.latent_dim, cfg.width)
        self.conv, self.enc, self.heads, self.dec = parts

    def onehot(self, y: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, self.cfg.n_classes).to(torch.float32)

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [0,1], y (B,) int -> μ, log σ² each (B, d)."""
        h = self.enc(torch.cat([self.conv(x), self.onehot(y)], 1))
        if len(self.heads) == 2:
            mu, logvar = self.heads[0](h), self.heads[1](h)
        else:
            mu, logvar = self.heads[0](h).chunk(2, dim=-1)
        return mu, clamp_logvar(logvar)

    def decode_logits(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """z (B, d), c (B, n_classes) one-hot -> logits (B, C, H, W)."""
        return self.dec(torch.cat([z, c], 1))

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Decoder mean g(z, y) in [0,1]: (B, C, H, W)."""
        return torch.sigmoid(self.decode_logits(z, self.onehot(y)))

    def elbo_terms(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
                   sample: bool = True) -> dict[str, torch.Tensor]:
        """One-sample ELBO pieces, each (B,): ``rec`` = log p(x|z, y), ``kl``, ``elbo``.

        ``sample=False`` reconstructs from z = μ, as the authors' notebook trains.
        """
        mu, logvar = self.encode(x, y)
        z = reparameterize(mu, logvar, generator) if sample else mu
        rec = likelihoods.bernoulli(x, self.decode_logits(z, self.onehot(y)))
        kl = kl_to_normal(mu, logvar)
        return {"rec": rec, "kl": kl, "elbo": rec - kl}
