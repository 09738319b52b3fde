"""The VAE of Kamoi & Kobayashi (papers 001/003, Appendix B, Tables 2 and 3).

A convolutional encoder to (μ, log σ²) and a transposed-convolution decoder to a
256-way categorical per pixel (softmax over 0..255), so log p(x|z) is a proper discrete
likelihood. Batch normalization after every convolution except the last of the encoder
and of the decoder; ReLU after each normalized convolution.

* ``gray`` (Table 2, 28×28): encoder 5×5 convs (8, s2), (16, s1), (32, s2), (64, s1),
  (64, s2) -> FC 2·latent (paper: latent 50). Decoder FC 3136 -> 64×7×7 -> 5×5 transposed
  convs (64, s2), (32, s2), (64, s1) -> 4×4 (256·C, s1). The table's paddings do not give
  28×28 under PyTorch's transposed-convolution arithmetic, so strided layers use
  padding 2 + output_padding 1 (7 -> 14 -> 28, TF's "SAME") and the last 4×4 layer is
  cropped to 28×28.
* ``color`` (Table 3, 32×32): same encoder, FC 2·latent (paper: 100); decoder z as
  latent×1×1 -> 4×4 transposed convs (64, s1, p0) 4×4, (32, s2) 8×8, (32, s2) 16×16,
  (256·C, s2) 32×32.

Nothing is reduced over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from oodlab.models import likelihoods
from oodlab.vae_math import gaussian_stats

ARCHS = ("gray", "color")


@dataclass(frozen=True)
class CatVAEConfig:
    arch: str = "gray"  # "gray" (Table 2, 28×28) | "color" (Table 3, 32×32)
    channels: int = 1  # input channels
    size: int = 28  # input height = width
    latent_dim: int = 50  # paper: 50 (gray), 100 (color)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose from {ARCHS}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")
        need = 28 if self.arch == "gray" else 32
        if self.size != need:
            raise ValueError(f"the {self.arch} architecture needs {need}×{need} inputs, got {self.size}×{self.size}")


def _conv_bn(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 5, stride, 1), nn.BatchNorm2d(cout), nn.ReLU()]


def _tconv_bn(cin: int, cout: int, k: int, stride: int, pad: int, out_pad: int = 0) -> list[nn.Module]:
    return [nn.ConvTranspose2d(cin, cout, k, stride, pad, output_padding=out_pad), nn.BatchNorm2d(cout), nn.ReLU()]


def _encoder(c: int, size: int) -> nn.Sequential:
    # 28: 13 -> 11 -> 5 -> 3 -> 1;  32: 15 -> 13 -> 6 -> 4 -> 1
    return nn.Sequential(*_conv_bn(c, 8, 2), *_conv_bn(8, 16, 1), *_conv_bn(16, 32, 2), *_conv_bn(32, 64, 1),
                         *_conv_bn(64, 64, 2), nn.Flatten())  # (B, 64)


class Crop(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : self.size, : self.size]


def _decoder(cfg: CatVAEConfig) -> nn.Sequential:
    c, d = cfg.channels, cfg.latent_dim
    if cfg.arch == "gray":
        return nn.Sequential(
            nn.Linear(d, 3136), nn.ReLU(), nn.Unflatten(1, (64, 7, 7)),
            *_tconv_bn(64, 64, 5, 2, 2, 1),  # (B, 64, 14, 14)
            *_tconv_bn(64, 32, 5, 2, 2, 1),  # (B, 32, 28, 28)
            *_tconv_bn(32, 64, 5, 1, 2),  # (B, 64, 28, 28)
            nn.ConvTranspose2d(64, 256 * c, 4, 1, 1), Crop(28),  # (B, 256·C, 28, 28)
        )
    return nn.Sequential(
        nn.Unflatten(1, (d, 1, 1)),
        *_tconv_bn(d, 64, 4, 1, 0),  # (B, 64, 4, 4)
        *_tconv_bn(64, 32, 4, 2, 1),  # 8×8
        *_tconv_bn(32, 32, 4, 2, 1),  # 16×16
        nn.ConvTranspose2d(32, 256 * c, 4, 2, 1),  # (B, 256·C, 32, 32)
    )


class CatVAE(nn.Module):
    """``encode`` -> (μ, log σ²); ``decode`` -> logits (B, 256, C, H, W); ``log_px`` per sample."""

    def __init__(self, cfg: CatVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = _encoder(cfg.channels, cfg.size)
        self.to_stats = nn.Linear(64, 2 * cfg.latent_dim)
        self.decoder = _decoder(cfg)

    @property
    def dims(self) -> int:
        return self.cfg.channels * self.cfg.size**2

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [0,1] -> μ, log σ² each (B, latent)."""
        return gaussian_stats(self.to_stats(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent) -> logits (B, 256, C, H, W)."""
        out = self.decoder(z)
        b, _, h, w = out.shape
        return out.view(b, 256, self.cfg.channels, h, w)

    def log_px(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """log p(x|z) = Σ_pixels log softmax(logits)[255·x], per sample (B,)."""
        return likelihoods.categorical256(x, logits)
