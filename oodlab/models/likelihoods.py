"""Per-sample log-likelihoods log p(x|z) of the decoders' noise models, summed over pixels.

Each takes the decoder's raw output and the [0,1] image batch and returns (B,).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bernoulli(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Σ_pixels [x log σ(l) + (1−x) log(1−σ(l))], grey levels as Bernoulli means (Nalisnick et al.)."""
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def gaussian(x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Σ_pixels log N(x; mean, σ²); ``log_sigma`` broadcasts against x (e.g. one per channel)."""
    ll = -0.5 * ((x - mean) / log_sigma.exp()).pow(2) - log_sigma - 0.5 * math.log(2 * math.pi)
    return ll.flatten(1).sum(1)


def categorical256(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Σ_pixels log softmax(logits)[x·255]: a 256-way categorical per pixel (papers 001/003/004).

    x: (B, C, H, W) in [0,1]; logits: (B, 256, C, H, W). A proper discrete likelihood,
    so −log p / (D ln 2) is an honest bits-per-dimension.
    """
    target = (x * 255).round().long()  # (B, C, H, W) in 0..255
    return -F.cross_entropy(logits, target, reduction="none").flatten(1).sum(1)
