"""A small single-scale Glow (Kingma & Dhariwal 2018) as used by Kamoi & Kobayashi (papers 001/003, Appendix B).

One block of ``steps`` flow steps, each actnorm -> invertible 1×1 convolution (LU) ->
affine coupling, with ``squeezes`` space-to-depth squeezes spread evenly over the
steps (the paper, Fashion-MNIST: squeeze, 16 steps, squeeze, 16 steps). There is no
multi-scale split (the paper removes it "to alleviate the spatial dependencies"), so z
has the full dimension D = C·H·W. As in the paper's Listing 1, the flow ends with
invertible linear maps over the width, height and channel axes of z, so every latent
coordinate (in particular z_0, the axis the mixture components sit on) mixes all positions.
There is no learned top prior (``learn_top`` off): the caller scores z.flatten(1) under
a fixed prior.

Coupling as in the OpenAI code, z_b <- (z_b + t(z_a)) · s(z_a), s = sigmoid(h + 2), plus
0.1 added to s "to stabilize the training" (paper Appendix B). Every layer maps
(B, C, H, W) -> (same or squeezed, log|det J| per sample (B,)); nothing is reduced over the batch.

Data (``dequantize``): y = (pixel + u) / 256 − 0.5 with u ~ U[0, 1)^D. Then
log P(x) ≥ E_u[log p(y)] − D log 256, so the nats this module reports are a proper
bound for the discrete 8-bit image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, cast

import torch
from torch import nn

COUPLING_EPS = 0.1  # added to the sigmoid scale (paper Appendix B; openai/glow issue 40)


@dataclass(frozen=True)
class GlowConfig:
    channels: int = 1  # input channels
    size: int = 28  # input height = width
    steps: int = 8  # flow steps (paper: 32 for Fashion-MNIST)
    hidden: int = 64  # coupling network width (paper/OpenAI code: 512)
    squeezes: int = 2  # space-to-depth squeezes, evenly spread over the steps (paper: 2 for 28×28)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.hidden < 1 or self.squeezes < 1:
            raise ValueError(
                f"glow steps, hidden and squeezes must be >= 1, got {self.steps}, {self.hidden}, {self.squeezes}"
            )
        if self.size % (2**self.squeezes):
            raise ValueError(
                f"glow_squeezes={self.squeezes} needs the image size {self.size} divisible by {2**self.squeezes}"
            )

    @property
    def dims(self) -> int:
        return self.channels * self.size**2


def _random_orthogonal(n: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n))[0]


class _Invertible(Protocol):
    def inverse(self, y: torch.Tensor) -> torch.Tensor: ...


class ActNorm(nn.Module):
    """y = (x + b) · exp(logs) per channel; data-dependent init gives zero mean, unit variance."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.initialized: torch.Tensor
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.bias.copy_(-mean)
        self.logs.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not bool(self.initialized):
            self.initialize(x)
        h, w = x.shape[2:]
        return (x + self.bias) * self.logs.exp(), (h * w * self.logs.sum()).expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * (-self.logs).exp() - self.bias


class InvConv1x1(nn.Module):
    """Invertible 1×1 convolution, W = P L (U + diag(sign · exp(log|s|))) (Glow §3.2, LU form)."""

    def __init__(self, channels: int):
        super().__init__()
        p, l, u = torch.linalg.lu(_random_orthogonal(channels))
        s = torch.diagonal(u)
        self.p: torch.Tensor
        self.sign_s: torch.Tensor
        self.l_mask: torch.Tensor
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("l_mask", torch.tril(torch.ones(channels, channels), -1))
        self.l = nn.Parameter(l)
        self.u = nn.Parameter(torch.triu(u, 1))
        self.log_s = nn.Parameter(s.abs().log())

    def weight(self) -> torch.Tensor:
        eye = torch.eye(len(self.log_s), dtype=self.l.dtype, device=self.l.device)
        lower = self.l * self.l_mask + eye
        upper = self.u * self.l_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.p @ lower @ upper

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[2:]
        y = torch.einsum("ij,bjhw->bihw", self.weight(), x)
        return y, (h * w * self.log_s.sum()).expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(self.weight()), y)


class AxisLinear(nn.Module):
    """Invertible linear map along one axis (1 = channel, 2 = height, 3 = width) of (B, C, H, W),
    plain weight with slogdet: log|det J| = (D / n) · log|det W| (paper Appendix B, Listing 1)."""

    def __init__(self, n: int, axis: int):
        super().__init__()
        self.axis = axis
        self.weight = nn.Parameter(_random_orthogonal(n))

    def _map(self, m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.movedim(torch.movedim(x, self.axis, -1) @ m.T, -1, self.axis)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[self.axis]
        logdet = x[0].numel() // n * torch.linalg.slogdet(self.weight)[1]
        return self._map(self.weight, x), logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self._map(torch.linalg.inv(self.weight), y)


class Coupling(nn.Module):
    """Affine coupling: x_b <- (x_b + t(x_a)) · (sigmoid(h(x_a) + 2) + 0.1); x_a unchanged."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.ca = channels // 2
        cb = channels - self.ca
        last = nn.Conv2d(hidden, 2 * cb, 3, padding=1)
        nn.init.zeros_(last.weight)  # zero init: each step starts near the identity (Glow §3.3)
        assert last.bias is not None
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(nn.Conv2d(self.ca, hidden, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(hidden, hidden, 1), nn.ReLU(), last)

    def _shift_scale(self, xa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, raw = self.net(xa).chunk(2, dim=1)
        return shift, torch.sigmoid(raw + 2.0) + COUPLING_EPS

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xa, xb = x[:, : self.ca], x[:, self.ca :]
        shift, scale = self._shift_scale(xa)
        return torch.cat([xa, (xb + shift) * scale], 1), scale.log().flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        ya, yb = y[:, : self.ca], y[:, self.ca :]
        shift, scale = self._shift_scale(ya)
        return torch.cat([ya, yb / scale - shift], 1)


class Squeeze(nn.Module):
    """Space-to-depth: (B, C, H, W) -> (B, 4C, H/2, W/2); volume preserving."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        y = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        return y, x.new_zeros(b)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        b, c4, h, w = y.shape
        c = c4 // 4
        return y.view(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)


def _layers(cfg: GlowConfig) -> list[nn.Module]:
    """squeeze, steps/S flow steps, squeeze, ... then the three axis mixers (Listing 1)."""
    layers: list[nn.Module] = []
    c, size = cfg.channels, cfg.size
    per = [cfg.steps // cfg.squeezes + (i < cfg.steps % cfg.squeezes) for i in range(cfg.squeezes)]
    for n_steps in per:
        layers.append(Squeeze())
        c, size = 4 * c, size // 2
        for _ in range(n_steps):
            layers += [ActNorm(c), InvConv1x1(c), Coupling(c, cfg.hidden)]
    return layers + [AxisLinear(size, 3), AxisLinear(size, 2), AxisLinear(c, 1)]


class Glow(nn.Module):
    """``forward`` y -> (z (B, D), log|det ∂z/∂y| (B,)); ``inverse`` z (B, D) -> y."""

    def __init__(self, cfg: GlowConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(_layers(cfg))
        c = cfg.channels * 4**cfg.squeezes
        self.z_shape = (c, cfg.size // 2**cfg.squeezes, cfg.size // 2**cfg.squeezes)

    @property
    def dims(self) -> int:
        return self.cfg.dims

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = y.new_zeros(y.shape[0])
        for layer in self.layers:
            y, ld = layer(y)
            logdet = logdet + ld
        return y.flatten(1), logdet

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        y = z.view(z.shape[0], *self.z_shape)
        for layer in reversed(self.layers):
            y = cast(_Invertible, layer).inverse(y)
        return y

    @torch.no_grad()
    def initialize(self, y: torch.Tensor) -> None:
        """Data-dependent actnorm init: one forward pass of a batch (OpenAI code's init pass)."""
        self.forward(y)


def dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 pixels -> y = (pixel + u) / 256 − 0.5, u ~ U[0, 1) (float32, same shape)."""
    u = torch.rand(x.shape, generator=generator, device=x.device)
    return (x.float() + u) / 256.0 - 0.5


def log_px(log_pz: torch.Tensor, logdet: torch.Tensor, dims: int) -> torch.Tensor:
    """Discrete-data bound log P(x) ≥ log p(z) + log|det ∂z/∂y| − D log 256 (nats, (B,))."""
    return log_pz + logdet - dims * math.log(256.0)
