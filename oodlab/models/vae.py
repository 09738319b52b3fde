"""Convolutional VAEs of paper 000 (Csiszárik et al.), returning per-sample quantities.

Two architectures:

* ``gray``  — the grayscale encoder of Rosca et al. (paper 000's ref. [14]): three 4×4
  stride-2 convolutions (32, 64, 128 filters, ReLU) and a dense layer to (μ, log σ²);
  the decoder mirrors it with transposed convolutions. Works on 28×28 or 32×32.
* ``color`` — the DCGAN-style model of paper 000 §IV-A: Conv–BatchNorm–ReLU, 4×4
  kernels, 32/64/128/256 filters in the encoder, two dense heads; the decoder maps z to
  a 4096-d vector = 256×4×4, then 128/64/32-filter transposed convolutions and a final
  3-filter convolution. Needs 32×32 inputs.

Two noise models p(x|z): ``bernoulli`` (pixel intensities in [0,1] as Bernoulli means,
cross-entropy, as in Nalisnick et al.) and ``gaussian`` (mean = sigmoid(logits), one
learned log σ per channel, bounded below so the density cannot collapse).

Nothing is reduced over the batch here: callers decide how to average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from oodlab.models import likelihoods
from oodlab.vae_math import gaussian_stats

ARCHS = ("gray", "color")
DECODERS = ("bernoulli", "gaussian")
MIN_LOG_SIGMA = math.log(1e-2)


@dataclass(frozen=True)
class VAEConfig:
    arch: str = "gray"  # "gray" (paper 000 ref. [14]) or "color" (DCGAN-style)
    decoder: str = "bernoulli"  # noise model p(x|z): "bernoulli" or "gaussian"
    channels: int = 1  # input channels
    size: int = 28  # input height = width
    latent_dim: int = 10  # paper 000 uses 10 for grayscale data

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose from {ARCHS}")
        if self.decoder not in DECODERS:
            raise ValueError(f"unknown decoder {self.decoder!r}; choose from {DECODERS}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if self.arch == "color" and self.size != 32:
            raise ValueError(f"the color architecture needs 32×32 inputs, got {self.size}×{self.size}")
        if self.arch == "gray" and self.size not in (28, 32):
            raise ValueError(f"the gray architecture needs 28×28 or 32×32 inputs, got {self.size}")


def _gray_encoder(c: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c, 32, 4, 2, 1), nn.ReLU(),  # (B, 32, S/2, S/2)
        nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),  # (B, 64, S/4, S/4)
        nn.Conv2d(64, 128, 4, 2, 1), nn.ReLU(),  # (B, 128, S/8, S/8); 28 -> 3, 32 -> 4
        nn.Flatten(),
    )


def _gray_decoder(c: int, size: int) -> nn.Sequential:
    s = size // 8  # 3 for 28, 4 for 32
    last_pad = 1 if size == 32 else 0  # 3 -> 6 -> 12 -> 28 needs output_padding on the first step
    return nn.Sequential(
        nn.Unflatten(1, (128, s, s)),
        nn.ConvTranspose2d(128, 64, 4, 2, 1, output_padding=1 - last_pad), nn.ReLU(),
        nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(32, c, 4, 2, 1),  # logits (B, C, S, S)
    )


def _cbr(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout), nn.ReLU()]


def _tbr(cin: int, cout: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout), nn.ReLU()]


def _color_encoder(c: int) -> nn.Sequential:
    return nn.Sequential(*_cbr(c, 32), *_cbr(32, 64), *_cbr(64, 128), *_cbr(128, 256), nn.Flatten())  # (B, 1024)


def _color_decoder(c: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Unflatten(1, (256, 4, 4)),
        *_tbr(256, 128), *_tbr(128, 64), *_tbr(64, 32),  # 4 -> 8 -> 16 -> 32
        nn.Conv2d(32, c, 3, 1, 1),  # logits (B, C, 32, 32)
    )


class VAE(nn.Module):
    """Gaussian-posterior VAE: ``encode`` gives (μ, log σ²), ``log_px`` gives log p(x|z) per sample."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        c, s, d = cfg.channels, cfg.size, cfg.latent_dim
        if cfg.arch == "gray":
            self.encoder, feat, hidden = _gray_encoder(c), 128 * (s // 8) ** 2, 128 * (s // 8) ** 2
            self.decoder = _gray_decoder(c, s)
        else:
            self.encoder, feat, hidden = _color_encoder(c), 1024, 4096
            self.decoder = _color_decoder(c)
        self.to_stats = nn.Linear(feat, 2 * d)  # -> (μ, log σ²)
        self.from_z = nn.Sequential(nn.Linear(d, hidden), nn.ReLU())
        self.log_sigma = nn.Parameter(torch.zeros(c)) if cfg.decoder == "gaussian" else None

    @property
    def dims(self) -> int:
        """Number of data dimensions D = C·H·W (for bits per dimension)."""
        return self.cfg.channels * self.cfg.size**2

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.to_stats.parameters()]

    def decoder_parameters(self) -> list[nn.Parameter]:
        extra = [self.log_sigma] if self.log_sigma is not None else []
        return [*self.from_z.parameters(), *self.decoder.parameters(), *extra]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [0,1] -> μ, log σ² each (B, D)."""
        return gaussian_stats(self.to_stats(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D) -> logits (B, C, H, W)."""
        return self.decoder(self.from_z(z))

    def log_px(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over pixels, per sample (B,)."""
        if self.log_sigma is None:
            return likelihoods.bernoulli(x, logits)
        log_sigma = self.log_sigma.clamp(min=MIN_LOG_SIGMA).view(1, -1, 1, 1)
        return likelihoods.gaussian(x, torch.sigmoid(logits), log_sigma)


def build_vae(cfg: VAEConfig) -> VAE:
    return VAE(cfg)
