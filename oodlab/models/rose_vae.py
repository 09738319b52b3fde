"""The VAE of paper 004 (Choi et al., ROSE), Appendix B.1, as the authors ran it.

``arch="dcgan_bn"`` (default) is Likelihood Regret's DCGAN VAE, which the paper follows
(github.com/XavierXiao/Likelihood-Regret, ``DCGAN_VAE_pixel.py``; the ROSE authors' code loads
it as ``DVAE.Encoder`` / ``DVAE.DCGAN_G``): encoder convs kernel 4, stride 2, no bias, channels
n, 2n, 4n, each followed by BatchNorm and ReLU, then two separate 4×4 head convs *with* bias
for μ and log σ² (the paper's "last two layers encode a mean and variance"); decoder
transposed convs 4n, 2n, n, each with BatchNorm and ReLU, and a final bias-free transposed conv
to 256 logits per pixel and channel (a 256-way categorical, ``likelihoods.categorical256``).
``arch="plain"`` has no BatchNorm and one fused bias-free (μ, log σ²) head.
n = 32 and latent 100 for Fashion-MNIST (``width``, ``latent_dim``); inputs are 32×32.
``init="dcgan"`` (default) is the authors' ``weights_init`` (``train_VAE_pixel.py``): every conv
and transposed-conv weight ~ N(0, 0.02), BatchNorm γ ~ N(1, 0.02) and β = 0, conv biases left at
PyTorch's default; ``init="torch"`` keeps PyTorch's default initialisation throughout.

BatchNorm couples the images of a batch in train mode, so everything that needs per-image
quantities (ROSE's per-sample gradients, IWAE, Likelihood Regret's encoder copies) runs the
model in eval mode, as the authors do (``netE.eval()``): BN is then a fixed per-channel affine
map. ``encode_with_preacts`` returns each encoder conv's input and output (pre-BN), which is
all ROSE needs to form per-sample gradients and EKFAC factors in one batched pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from oodlab.models import likelihoods
from oodlab.vae_math import clamp_logvar, gaussian_stats, kl_to_normal, reparameterize

ARCHS = ("dcgan_bn", "plain")
INITS = ("dcgan", "torch")


@dataclass(frozen=True)
class RoseVAEConfig:
    channels: int = 1  # input channels
    size: int = 32  # input height = width (the paper resizes everything to 32)
    width: int = 32  # n: first conv's channels, doubled per layer (paper: 32 FMNIST, 64 CIFAR-10)
    latent_dim: int = 100  # paper: 100 FMNIST, 200 CIFAR-10
    arch: str = "dcgan_bn"  # dcgan_bn (Likelihood Regret's, BatchNorm + separate heads) | plain
    init: str = "dcgan"  # dcgan: N(0, 0.02) conv weights, BN γ ~ N(1, 0.02) (the authors') | torch: PyTorch's

    def __post_init__(self) -> None:
        if self.size != 32:
            raise ValueError(f"the ROSE VAE needs 32×32 inputs (resize or pad 28×28 sets), got {self.size}")
        if self.width < 1 or self.latent_dim < 1:
            raise ValueError(f"width and latent_dim must be >= 1, got {self.width}, {self.latent_dim}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")


def _norm(c: int, bn: bool) -> nn.Module:
    return nn.BatchNorm2d(c) if bn else nn.Identity()


@torch.no_grad()
def dcgan_init(model: nn.Module, std: float = 0.02) -> None:
    """DCGAN initialisation (Radford et al. 2016; the authors' ``weights_init``), drawn from torch's
    global RNG: conv / transposed-conv weights ~ N(0, std), BatchNorm γ ~ N(1, std), β = 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.weight.normal_(0.0, std)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.normal_(1.0, std)
            m.bias.zero_()


class RoseVAE(nn.Module):
    """Conv VAE with a categorical-256 decoder; ``encode``/``decode``/``log_px`` as ``oodlab.models.vae.VAE``.

    ``convs`` lists the encoder convs ROSE scores, in order: the three body convs, then the
    head(s) (μ and log σ² for ``dcgan_bn``, the fused one for ``plain``).
    """

    def __init__(self, cfg: RoseVAEConfig):
        super().__init__()
        self.cfg = cfg
        c, n, d = cfg.channels, cfg.width, cfg.latent_dim
        bn = cfg.arch == "dcgan_bn"
        self.body = nn.ModuleList([
            nn.Conv2d(c, n, 4, 2, 1, bias=False),  # (B, n, 16, 16)
            nn.Conv2d(n, 2 * n, 4, 2, 1, bias=False),  # (B, 2n, 8, 8)
            nn.Conv2d(2 * n, 4 * n, 4, 2, 1, bias=False),  # (B, 4n, 4, 4)
        ])
        self.norms = nn.ModuleList([_norm(n, bn), _norm(2 * n, bn), _norm(4 * n, bn)])
        heads = [nn.Conv2d(4 * n, d, 4), nn.Conv2d(4 * n, d, 4)]  # μ, log σ²: (B, d, 1, 1), with bias
        self.heads = nn.ModuleList(heads if bn else [nn.Conv2d(4 * n, 2 * d, 4, 1, 0, bias=False)])  # or fused
        self.dec = nn.Sequential(
            nn.ConvTranspose2d(d, 4 * n, 4, 1, 0, bias=False), _norm(4 * n, bn), nn.ReLU(),  # (B, 4n, 4, 4)
            nn.ConvTranspose2d(4 * n, 2 * n, 4, 2, 1, bias=False), _norm(2 * n, bn), nn.ReLU(),  # (B, 2n, 8, 8)
            nn.ConvTranspose2d(2 * n, n, 4, 2, 1, bias=False), _norm(n, bn), nn.ReLU(),  # (B, n, 16, 16)
            nn.ConvTranspose2d(n, 256 * c, 4, 2, 1, bias=not bn),  # (B, 256·C, 32, 32) logits
        )
        if cfg.init == "dcgan":
            dcgan_init(self)

    @property
    def convs(self) -> list[nn.Conv2d]:
        return [cast(nn.Conv2d, m) for m in (*self.body, *self.heads)]

    @property
    def has_bn(self) -> bool:
        return self.cfg.arch == "dcgan_bn"

    @property
    def dims(self) -> int:
        return self.cfg.channels * self.cfg.size**2

    def _split(self, heads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(heads) == 2:
            return heads[0].flatten(1), clamp_logvar(heads[1].flatten(1))
        return gaussian_stats(heads[0].flatten(1))

    def encode_with_preacts(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """μ, log σ² (B, D), plus each conv's (``convs`` order) input and output (before BatchNorm)."""
        inputs, preacts, h = [], [], x
        for conv, norm in zip(self.body, self.norms):
            inputs.append(h)
            a = conv(h)
            preacts.append(a)
            h = F.relu(norm(a))
        for head in self.heads:
            inputs.append(h)
            preacts.append(head(h))
        mu, logvar = self._split(preacts[len(self.body):])
        return mu, logvar, inputs, preacts

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar, _, _ = self.encode_with_preacts(x)
        return mu, logvar

    def encoder_copies(self, b: int) -> list[torch.Tensor]:
        """``b`` copies of every encoder parameter (``encoder_parameters`` order): conv weights as
        (b, C_in·k·k, C_out) (``encode_copies``' layout), biases and BatchNorm γ, β as (b, C)."""
        out = []
        for p in self.encoder_parameters():
            w = p.detach().flatten(1).T if p.dim() == 4 else p.detach()
            out.append(w.expand(b, *w.shape).contiguous())
        return out

    def encode_copies(self, weights: list[torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder copy j (its own parameters, ``encoder_copies`` layout) on image j: μ, log σ² (B, D).

        Each conv is im2col + one batched matmul, patches (B, L, C_in·k·k) @ W (B, C_in·k·k, C_out):
        on the 2-core CPU 2.2× faster than ``vmap`` of ``functional_call`` (a grouped conv). This
        operand order avoids a matrix-vector ``bmm`` (slow for the 4×4 head) and gives contiguous
        weight gradients, which fused Adam needs. BatchNorm must be in eval mode (running
        statistics; each copy has its own γ, β), as in Likelihood Regret's ``netE_copy.eval()``.
        """
        if self.has_bn and self.training:
            raise RuntimeError("encode_copies needs the model in eval mode (BatchNorm running statistics)")
        it: Iterator[torch.Tensor] = iter(weights)

        def conv(m: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
            pad = cast(tuple[int, int], m.padding)
            side = (h.shape[-1] + 2 * pad[0] - m.kernel_size[0]) // m.stride[0] + 1
            cols = F.unfold(h, m.kernel_size, padding=pad, stride=m.stride)  # (B, C_in·k·k, L)
            a = torch.bmm(cols.transpose(1, 2), next(it)).transpose(1, 2).reshape(len(h), -1, side, side)
            return a + next(it)[:, :, None, None] if m.bias is not None else a

        h = x
        n_body = len(self.body)
        for m, norm in zip(self.convs[:n_body], self.norms):
            a = conv(m, h)
            if isinstance(norm, nn.BatchNorm2d):
                mean, var = norm.running_mean, norm.running_var
                assert mean is not None and var is not None  # BatchNorm2d tracks running statistics
                scale = (var + norm.eps).rsqrt()[None, :, None, None]
                gamma, beta = next(it), next(it)
                a = (a - mean[None, :, None, None]) * scale * gamma[:, :, None, None] + beta[:, :, None, None]
            h = F.relu(a)
        return self._split([conv(head, h) for head in self.convs[n_body:]])

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
        """Encoder parameters in ``encoder_copies`` order: per body layer conv weight, BN γ, β; then the heads."""
        out: list[nn.Parameter] = []
        for conv, norm in zip(self.convs, self.norms):
            out += [cast(nn.Parameter, conv.weight), *norm.parameters()]
        for head in self.heads:
            out += list(head.parameters())
        return out


def elbo(model: RoseVAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """One-sample ELBO per image (B,), z = μ + σ·eps with the noise given (so it is a pure function)."""
    return elbo_from_stats(model, x, *model.encode(x), eps)


def elbo_from_stats(model: RoseVAE, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                    eps: torch.Tensor) -> torch.Tensor:
    """``elbo`` given the posterior's μ, log σ² (from ``encode`` or from per-image encoder copies)."""
    z = reparameterize(mu, logvar, eps=eps)
    return model.log_px(x, model.decode(z)) - kl_to_normal(mu, logvar)
