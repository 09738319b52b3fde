"""The VAE of paper 004 (Choi et al., ROSE), Appendix B.1.

Encoder: four convolutions, kernel 4, no biases, channels n, 2n, 4n and then one
4×4 "head" convolution whose 2·latent output channels are (μ, log σ²) — the paper's
"last two layers encode a mean and variance" fused into one weight so every encoder
layer is a plain conv (n = 32 for Fashion-MNIST, 64 for CIFAR-10; latent 100 / 200).
Decoder: the mirror image with transposed convolutions, ending in 256 logits per
pixel and channel (a 256-way categorical, ``likelihoods.categorical256``).
Inputs are 32×32 (28×28 sets are zero-padded, ``pad=True``).

``encode_with_preacts`` also returns each encoder conv's input and pre-activation, which
is all ROSE needs to form per-sample gradients and EKFAC factors in one batched pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from oodlab.models import likelihoods


@dataclass(frozen=True)
class RoseVAEConfig:
    channels: int = 1  # input channels
    size: int = 32  # input height = width (the paper resizes everything to 32)
    width: int = 32  # n: first conv's channels, doubled per layer (paper: 32 FMNIST, 64 CIFAR-10)
    latent_dim: int = 100  # paper: 100 FMNIST, 200 CIFAR-10

    def __post_init__(self) -> None:
        if self.size != 32:
            raise ValueError(f"the ROSE VAE needs 32×32 inputs (use pad=True for 28×28), got {self.size}")
        if self.width < 1 or self.latent_dim < 1:
            raise ValueError(f"width and latent_dim must be >= 1, got {self.width}, {self.latent_dim}")


class RoseVAE(nn.Module):
    """Conv VAE with a categorical-256 decoder; ``encode``/``decode``/``log_px`` as ``oodlab.models.vae.VAE``."""

    def __init__(self, cfg: RoseVAEConfig):
        super().__init__()
        self.cfg = cfg
        c, n, d = cfg.channels, cfg.width, cfg.latent_dim
        self.enc = nn.ModuleList([
            nn.Conv2d(c, n, 4, 2, 1, bias=False),  # (B, n, 16, 16)
            nn.Conv2d(n, 2 * n, 4, 2, 1, bias=False),  # (B, 2n, 8, 8)
            nn.Conv2d(2 * n, 4 * n, 4, 2, 1, bias=False),  # (B, 4n, 4, 4)
            nn.Conv2d(4 * n, 2 * d, 4, 1, 0, bias=False),  # (B, 2d, 1, 1) -> μ, log σ²
        ])
        self.dec = nn.Sequential(
            nn.ConvTranspose2d(d, 4 * n, 4, 1, 0, bias=False), nn.ReLU(),  # (B, 4n, 4, 4)
            nn.ConvTranspose2d(4 * n, 2 * n, 4, 2, 1, bias=False), nn.ReLU(),  # (B, 2n, 8, 8)
            nn.ConvTranspose2d(2 * n, n, 4, 2, 1, bias=False), nn.ReLU(),  # (B, n, 16, 16)
            nn.ConvTranspose2d(n, 256 * c, 4, 2, 1),  # (B, 256·C, 32, 32) logits
        )

    @property
    def dims(self) -> int:
        return self.cfg.channels * self.cfg.size**2

    def encode_with_preacts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """μ, log σ² (B, D), plus each conv's input and output (pre-activation)."""
        inputs, preacts, h = [], [], x
        for i, conv in enumerate(self.enc):
            inputs.append(h)
            a = conv(h)
            preacts.append(a)
            h = F.relu(a) if i < len(self.enc) - 1 else a
        mu, logvar = h.flatten(1).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0), inputs, preacts

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar, _, _ = self.encode_with_preacts(x)
        return mu, logvar

    def encoder_copies(self, b: int) -> list[torch.Tensor]:
        """``b`` copies of the encoder's conv weights, per layer (b, C_in·k·k, C_out): ``encode_copies``' layout."""
        return [w.detach().flatten(1).T.expand(b, -1, -1).contiguous() for w in self.encoder_parameters()]

    def encode_copies(self, weights: list[torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder copy j (its own weights, ``encoder_copies`` layout) on image j: μ, log σ² (B, D).

        Each conv is im2col + one batched matmul, patches (B, L, C_in·k·k) @ W (B, C_in·k·k, C_out):
        on the 2-core CPU 2.2× faster than ``vmap`` of ``functional_call`` (a grouped conv). This
        operand order avoids a matrix-vector ``bmm`` (slow for the 4×4 head) and gives contiguous
        weight gradients, which fused Adam needs.
        """
        h = x
        for i, (conv, w) in enumerate(zip(self.enc, weights)):
            side = (h.shape[-1] + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
            cols = F.unfold(h, conv.kernel_size, padding=conv.padding, stride=conv.stride)  # (B, C_in·k·k, L)
            a = torch.bmm(cols.transpose(1, 2), w).transpose(1, 2).reshape(len(x), -1, side, side)
            h = F.relu(a) if i < len(self.enc) - 1 else a
        mu, logvar = h.flatten(1).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D) -> logits (B, 256, C, H, W)."""
        out = self.dec(z[:, :, None, None])
        b, _, h, w = out.shape
        return out.view(b, 256, self.cfg.channels, h, w)

    def log_px(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return likelihoods.categorical256(x, logits)

    def rows_per_pass(self, device: torch.device | str) -> int:
        """Images per decoder pass (scoring passes, training micro-batches): what the device runs fastest.

        A row's 256-way logits take 1 MiB at 1×32×32. On a CPU a pass is fastest while its
        logits stay in cache: 8 rows scored NLL and ROSE 2–2.5× faster per image than 128 on
        the 2-core dev machine, and 32 rows already fell off the cliff (benchmarks/README.md).
        A GPU wants wide passes; 256 rows of logits are 256 MiB of its memory.
        """
        row_bytes = 256 * self.dims * 4
        budget = 8 * 2**20 if torch.device(device).type == "cpu" else 256 * 2**20
        return max(1, budget // row_bytes)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.enc.parameters())


def elbo(model: RoseVAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """One-sample ELBO per image (B,), z = μ + σ·eps with the noise given (so it is a pure function)."""
    mu, logvar = model.encode(x)
    z = mu + eps * (0.5 * logvar).exp()
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
    return model.log_px(x, model.decode(z)) - kl
