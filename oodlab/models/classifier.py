"""Small CNN classifier for 28×28 grey images (paper 002's classifier).

``arch="notebook"`` (default) is the authors' Keras model (sverneka/OODGen, ``Classifier.get_model``):
Conv(32, 3×3, valid)–ReLU–Conv(64, 3×3, valid)–ReLU–MaxPool(2)–Dropout(0.25)–Dense(128)–ReLU–
Dropout(0.5)–Dense(k); for 28×28 inputs the dense layer sees 64·12·12 = 9,216 features.
``arch="pooled"`` pools after each ('same'-padded) convolution: a 64·7·7 = 3,136-wide dense input.
The dropout layers are what MC-dropout samples. ``features`` returns the penultimate 128-d
activations (Mahalanobis detector, Lee et al. 2018b). No batch norm, so in eval mode every
sample is scored independently of its batch.
"""

from __future__ import annotations

import torch
from torch import nn

CLASSIFIER_ARCHS = ("notebook", "pooled")


def _trunk(arch: str, channels: int, size: int) -> tuple[nn.Sequential, int]:
    """The deterministic convolutions and the width of their flattened output."""
    if arch == "notebook":
        side = (size - 4) // 2
        return nn.Sequential(
            nn.Conv2d(channels, 32, 3), nn.ReLU(),  # (B, 32, S−2, S−2)
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, (S−4)/2, (S−4)/2)
        ), 64 * side**2
    if arch == "pooled":
        return nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, S/2, S/2)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, S/4, S/4)
        ), 64 * (size // 4) ** 2
    raise ValueError(f"classifier arch must be one of {CLASSIFIER_ARCHS}, got {arch!r}")


class Classifier(nn.Module):
    """``trunk`` (deterministic convolutions) -> ``tail`` (dropout, dense, dropout, logits).

    Dropout lives only in ``tail``, so MC-dropout reuses one trunk pass for all its samples.
    """

    def __init__(self, n_out: int, channels: int = 1, size: int = 28, width: int = 128, arch: str = "notebook"):
        super().__init__()
        self.trunk, feat = _trunk(arch, channels, size)
        self.dense = nn.Sequential(nn.Dropout(0.25), nn.Flatten(), nn.Linear(feat, width), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(width, n_out))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, width)."""
        return self.dense(self.trunk(x))

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.dense(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> logits (B, n_out)."""
        return self.tail(self.trunk(x))


class Generator(nn.Module):
    """MLP generator z -> image in [0,1] for the confident-classifier GAN (Lee et al. 2018a)."""

    def __init__(self, z_dim: int = 64, channels: int = 1, size: int = 28, width: int = 256):
        super().__init__()
        self.z_dim, self.shape = z_dim, (channels, size, size)
        self.net = nn.Sequential(nn.Linear(z_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, channels * size * size), nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, *self.shape)


class Discriminator(nn.Module):
    """MLP discriminator image -> logit of "real"."""

    def __init__(self, channels: int = 1, size: int = 28, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, width), nn.LeakyReLU(0.2),
                                 nn.Linear(width, width), nn.LeakyReLU(0.2), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)
