"""ROSE: the Fisher score of a test image's gradient (Choi et al., paper 004, §4).

For each encoder conv layer l with weights θ^l and s(x) = ∇_θl log p(x|θ) (one-sample ELBO):

    S^l(x) = s(x)ᵀ F_X^{-1} s(x),       F_X = E_{x∈X}[s sᵀ]                    (eq. 5)
    diagonal:  F_X ≈ E_X[diag(s sᵀ)]                                          (eq. 6)
    EKFAC:     F_X ≈ (U_A ⊗ U_B) diag(Σ) (U_A ⊗ U_B)ᵀ,  U_A, U_B eigenbases of
               A = E[h hᵀ] (conv input patches), B = E[δ δᵀ] (pre-activation grads),
               Σ = E_X[(U_Bᵀ G U_A)²] with G the (C_out × C_in·k·k) gradient       (eqs. 8–9)
    ROSE(x) = max_l ReLU((S^l(x) − μ^l) / σ^l), μ, σ over X                   (eqs. 10–11, β=0, p=∞)

Per-sample gradients are batched: one forward/backward of the summed loss gives every
conv's input h and output gradient δ per image, and G_n = Σ_t δ_{n,t} h_{n,t}ᵀ
(the "hooks" method, no Python loop over images). The trial (``Experiment``) trains the
paper's VAE once (cached on disk by its training config, checkpointed every epoch so an
interrupted training continues) and then computes every score named in ``scores``: ROSE and
the baselines of ``oodlab.methods.likelihood_baselines``.

Defaults are the authors' setup (github.com/shinypond/ood_detection): 32×32 inputs, the VAE
trained 100 epochs with horizontal flips and DCGAN initialisation, the Fisher fitted on 10,000
ID training images, noise and constant OOD images drawn at 32×32, and the "overall" set in the
paper's proportions (``oodlab.data.overall_counts``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from oodlab import data
from oodlab.experiment import ConfigError, Scores, SetInfos, TrialConfig, evaluation_table, require, score_key, set_key
from oodlab.experiment import Experiment as BaseExperiment
from oodlab.methods import likelihood_baselines as lb
from oodlab.models.rose_vae import INITS, RoseVAE, RoseVAEConfig, elbo
from oodlab.vae_math import kl_to_normal, reparameterize

PRECONDITIONERS = ("diag", "ekfac")
log = logging.getLogger(__name__)
SCORES = ("rose", "rose_diag", "rose_ekfac", "nll", "lr", "lratio", "ic_png", "ic_jp2", "rnd")

# ---------------------------------------------------------------- per-sample gradients


def layer_terms(model: RoseVAE, x: torch.Tensor, eps: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per encoder conv layer (``model.convs``), each image's input patches h (B, L, C_in·k·k [+1])
    and output gradients δ (B, L, C_out).

    One batched forward/backward of Σ_n −ELBO_n; in eval mode images are independent, so δ of
    image n is ∂(−ELBO_n)/∂a_n and its weight gradient is G_n = Σ_t δ_{n,t} h_{n,t}ᵀ. A conv with
    a bias gets a constant 1 appended to h, so G_n's last column is the bias gradient (the
    authors' ``cat([weight.grad, bias.grad], 1)``). eps = 0 gives z = μ.
    """
    if model.training and model.has_bn:
        raise RuntimeError("per-sample gradients need the VAE in eval mode (BatchNorm couples a batch in train mode)")
    mu, logvar, inputs, preacts = model.encode_with_preacts(x)
    z = reparameterize(mu, logvar, eps=eps)
    kl = kl_to_normal(mu, logvar)
    loss = (kl - model.log_px(x, model.decode(z))).sum()
    deltas = torch.autograd.grad(loss, preacts)
    out = []
    for conv, h, d in zip(model.convs, inputs, deltas):
        pad = cast(tuple[int, int], conv.padding)
        p = F.unfold(h.detach(), conv.kernel_size, padding=pad, stride=conv.stride).transpose(1, 2)
        if conv.bias is not None:
            p = torch.cat([p, p.new_ones(*p.shape[:2], 1)], 2)
        out.append((p, d.flatten(2).transpose(1, 2)))
    return out


def grads_from_terms(p: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """G_n = Σ_t δ_{n,t} h_{n,t}ᵀ: (B, C_out, Din), the layout of ``conv.weight.flatten(1)`` (+ bias column)."""
    return torch.einsum("blo,bli->boi", d, p)


# ---------------------------------------------------------------- preconditioners


def diag_fisher(grads: torch.Tensor) -> torch.Tensor:
    """Diagonal Fisher E_X[s²] (eq. 6) of a batch of per-sample grads (N, ...)."""
    return grads.pow(2).mean(0)


def kfac_factors(p: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (Σ_{n,t} h hᵀ, Σ_{n,t} δ δᵀ) / N of one layer (Grosse & Martens' KFC, eq. 8)."""
    n = p.shape[0]
    return torch.einsum("bli,blj->ij", p, p) / n, torch.einsum("blo,blq->oq", d, d) / n


def eigenbasis(a: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric factor (in float64 for stability)."""
    return torch.linalg.eigh(a.double())[1].to(a.dtype)


def projected_grads(p: torch.Tensor, d: torch.Tensor, u_a: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    """U_Bᵀ G_n U_A = Σ_t (U_Bᵀ δ_t)(U_Aᵀ h_t)ᵀ: project the factors first (B·L·Din² instead of B·Cout·Din²)."""
    return grads_from_terms(p @ u_a, d @ u_b)


def quad(g: torch.Tensor, fisher: torch.Tensor, damping: float, relative: bool = False) -> torch.Tensor:
    """gᵀ (diag(F) + λ)^{-1} g per sample, (B,); λ = damping (the authors: 1e-8), or damping × mean(F)."""
    return (g.pow(2) / (fisher + damping * (fisher.mean() if relative else 1.0))).flatten(1).sum(1)


@dataclass
class RoseFit:
    """What ROSE keeps from the ID set: a preconditioner per layer and the layer z-scores."""

    kind: str  # "diag" | "ekfac"
    fisher: list[torch.Tensor]  # per layer: diag F (diag) or Σ in the eigenbasis (ekfac), shaped like G
    bases: list[tuple[torch.Tensor, torch.Tensor]] | None  # (U_A, U_B) per layer (ekfac)
    damping: float
    relative: bool = False  # damping relative to the mean of F (else absolute)
    mean: torch.Tensor | None = None  # (L,) μ^l
    std: torch.Tensor | None = None  # (L,) σ^l

    def grads(self, terms: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Per-sample grads in this preconditioner's basis (parameter basis or Kronecker eigenbasis)."""
        if self.bases is None:  # diag
            return [grads_from_terms(p, d) for p, d in terms]
        return [projected_grads(p, d, ua, ub) for (p, d), (ua, ub) in zip(terms, self.bases)]

    def layer_scores(self, terms: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """S^l = sᵀ F^{-1} s (eq. 5) for a batch: (B, L)."""
        return torch.stack([quad(g, f, self.damping, self.relative) for g, f in zip(self.grads(terms), self.fisher)], 1)

    def score(self, terms: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """ROSE = max_l ReLU((S^l − μ^l)/σ^l), (B,) (eq. 11, β = 0, p = ∞)."""
        assert self.mean is not None and self.std is not None, "fit_rose sets the z-score statistics"
        return F.relu((self.layer_scores(terms) - self.mean) / self.std).amax(1)


def _passes(model: RoseVAE, x_u8: torch.Tensor, eps: torch.Tensor, batch: int | None) -> Iterator[tuple[int, list]]:
    batch = batch or model.rows_per_pass(x_u8.device)
    for i in range(0, len(x_u8), batch):
        yield i, layer_terms(model, data.to_float(x_u8[i : i + batch]), eps[i : i + batch])


def fit_rose(model: RoseVAE, x_u8: torch.Tensor, eps: torch.Tensor, kinds: tuple[str, ...], batch: int | None = None,
             damping: float = 1e-8, relative: bool = False) -> dict[str, RoseFit]:
    """Fit the preconditioners and z-score statistics on N ID images (Algorithm 1), in batches.

    Pass 1: diag F and the Kronecker factors; pass 2: EKFAC's Σ and diag's layer scores;
    pass 3: EKFAC's layer scores. Nothing per-sample is kept between passes.
    """
    n = len(x_u8)
    acc: dict[str, list[torch.Tensor]] = {}

    def add(key: str, vals: list[torch.Tensor]) -> None:
        acc[key] = [a + v for a, v in zip(acc[key], vals)] if key in acc else vals

    for _, terms in _passes(model, x_u8, eps, batch):
        w = len(terms[0][0]) / n
        if "diag" in kinds:
            add("diag", [diag_fisher(grads_from_terms(p, d)) * w for p, d in terms])
        if "ekfac" in kinds:
            ab = [kfac_factors(p, d) for p, d in terms]
            add("A", [a * w for a, _ in ab])
            add("B", [b * w for _, b in ab])
    fits = {}
    if "diag" in kinds:
        fits["diag"] = RoseFit("diag", acc["diag"], None, damping, relative)
    if "ekfac" in kinds:
        bases = [(eigenbasis(a), eigenbasis(b)) for a, b in zip(acc["A"], acc["B"])]
        for _, terms in _passes(model, x_u8, eps, batch):
            projected = (projected_grads(p, d, ua, ub) for (p, d), (ua, ub) in zip(terms, bases))
            add("sigma", [diag_fisher(g) * (len(g) / n) for g in projected])
        fits["ekfac"] = RoseFit("ekfac", acc["sigma"], bases, damping, relative)
    for fit in fits.values():
        s = torch.cat([fit.layer_scores(terms) for _, terms in _passes(model, x_u8, eps, batch)])  # (N, L)
        fit.mean, fit.std = s.mean(0), s.std(0).clamp_min(1e-12)
    return fits


def rose_scores(
    model: RoseVAE, x_u8: torch.Tensor, eps: torch.Tensor, fits: dict[str, RoseFit], batch: int | None = None
) -> dict[str, torch.Tensor]:
    """ROSE of every image under every fitted preconditioner, {kind: (N,)}; one backward pass serves all."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in fits}
    for _, terms in _passes(model, x_u8, eps, batch):
        for k, fit in fits.items():
            parts[k].append(fit.score(terms))
    return {k: torch.cat(v) for k, v in parts.items()}


# ---------------------------------------------------------------- training (cached)


def hflip_half(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image mirrored left-right with probability ½ (torchvision's ``RandomHorizontalFlip(0.5)``)."""
    flip = (torch.rand(len(x), generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _load_progress(path: Path | None, model: RoseVAE, opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.StepLR, gen: torch.Generator) -> list[float]:
    """Restore a training checkpoint written by ``_save_progress``; returns its loss history ([] if none)."""
    if path is None or not path.is_file():
        return []
    state = torch.load(path, map_location=next(model.parameters()).device, weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    gen.set_state(state["gen"])
    log.info("VAE training continues after epoch %d from %s", len(state["history"]), path)
    return [float(v) for v in state["history"]]


def _save_progress(path: Path | None, model: RoseVAE, opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.StepLR, gen: torch.Generator, history: list[float]) -> None:
    if path is None:
        return
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
             "gen": gen.get_state(), "history": torch.tensor(history, dtype=torch.float64)}
    atomic_save(state, path)


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """torch.save through a temporary file and a rename: a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def train_vae(model: RoseVAE, x_u8: torch.Tensor, epochs: int, batch_size: int, lr: float, seed: int,
              perturb: str | None = None, l2: float = 0.0, hflip: bool = False,
              progress: Path | None = None) -> list[float]:
    """Adam, lr halved every 30 epochs (App. B.1); ``perturb``/``l2`` make LRatio's background model.

    ``hflip``: each training image mirrored with probability ½ (the authors' ``augment='hflip'``
    VAEs). ``progress``: a file holding model, optimiser, schedule and RNG after every epoch; a
    training that finds it continues from there (a killed 100-epoch run loses one epoch at most).

    The loss per batch is the mean −ELBO per image in nats/dim, plus λ‖θ‖² with λ = ``l2`` as is
    (Ren et al.'s L2 coefficient, paper 004 App. B.3: λ ∈ {0, 10}; not divided by the set size).

    Without BatchNorm each batch's gradient is summed over micro-batches of ``model.rows_per_pass``
    images: the same gradient as one pass, 2.3× faster on the 2-core CPU (batch 64 as 8 × 8), where a
    whole batch's 256-way logits (64 MiB) fall out of cache. With BatchNorm the batch is one pass
    (its statistics are the batch's). The model is left in eval mode.
    """
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.5)
    gen = torch.Generator().manual_seed(seed)
    dev = x_u8.device
    micro = batch_size if model.has_bn else model.rows_per_pass(dev)
    history = _load_progress(progress, model, opt, sched, gen)
    for epoch in range(len(history), epochs):
        t0, tot, nb = time.perf_counter(), torch.zeros((), device=dev), 0
        for idx in data.batch_indices(len(x_u8), batch_size, shuffle=True, generator=gen, device=dev):
            xb = x_u8[idx]
            if hflip:
                xb = hflip_half(xb, gen)
            if perturb:
                xb = lb.perturb(xb, perturb, gen)
            x = data.to_float(xb)
            eps = torch.randn(len(x), model.cfg.latent_dim, generator=gen).to(dev)
            opt.zero_grad(set_to_none=True)
            for j in range(0, len(x), micro):
                part = -elbo(model, x[j : j + micro], eps[j : j + micro]).sum() / (len(x) * model.dims)  # nats/dim
                part.backward()
                tot += part.detach()
            if l2 > 0:
                reg = l2 * torch.stack([p.pow(2).sum() for p in model.parameters()]).sum()
                reg.backward()
                tot += reg.detach()
            opt.step()
            nb += 1
        sched.step()
        history.append(float(tot) / nb)
        log.info("VAE epoch %d/%d: %.4f nats/dim, %.0f s", epoch + 1, epochs, history[-1], time.perf_counter() - t0)
        if not math.isfinite(history[-1]):
            raise FloatingPointError(f"VAE loss became {history[-1]}; try a smaller lr")
        _save_progress(progress, model, opt, sched, gen, history)
    model.eval()
    return history


def _cache_file(folder: str, key: dict[str, Any]) -> Path | None:
    if not folder:
        return None
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder).expanduser() / f"vae-{h}.pt"


def ensure_vae(cfg: Config, x_u8: torch.Tensor, device: torch.device, perturb: str | None = None,
               l2: float = 0.0) -> tuple[RoseVAE, list[float]]:
    """Load the VAE trained with this config from ``cfg.vae_cache``, or train and store it (train once, score many).

    ``x_u8``: the ID training images as loaded; resized to 32×32 here when ``cfg.resize`` (a no-op
    when they already are), so the study's driver and the trials train the same model."""
    if cfg.resize:
        x_u8 = data.resize(x_u8, 32)
    c, h, w = x_u8.shape[1:]
    vcfg = cfg.vae_config((c, h, w))
    path = _cache_file(cfg.vae_cache, vae_key(cfg, len(x_u8), perturb, l2))
    model = new_vae(cfg, vcfg, device, perturb)
    if path is not None and path.is_file():
        state = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        return model.eval(), list(state["history"])
    progress = None if path is None else path.with_suffix(".partial.pt")
    history = train_vae(model, x_u8, cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed, perturb, l2, cfg.hflip, progress)
    if path is not None:
        atomic_save({"model": model.state_dict(), "history": history,
                     "key": json.dumps(vae_key(cfg, len(x_u8), perturb, l2))}, path)
        assert progress is not None
        progress.unlink(missing_ok=True)
    return model.eval(), history


def vae_key(cfg: Config, n: int, perturb: str | None, l2: float) -> dict[str, Any]:
    """What names one trained VAE in the cache. Fields enter the key only away from their neutral value
    (plain arch, no resize, no flips, PyTorch's init, no L2), so a key written without them still names
    the same training."""
    key: dict[str, Any] = dict(id=cfg.id, val_n=cfg.val_n, train_n=cfg.train_n, n=n, pad=cfg.pad, epochs=cfg.epochs,
                               batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, width=cfg.width,
                               latent_dim=cfg.latent_dim, perturb=perturb, l2=l2)
    if cfg.arch != "plain" or cfg.resize:
        key.update(arch=cfg.arch, resize=cfg.resize)
    if l2 > 0:  # λ‖θ‖² as is, not divided by the set size
        key["l2_scale"] = "none"
    if cfg.hflip:
        key["hflip"] = True
    if cfg.init != "torch":
        key["init"] = cfg.init
    return key


def new_vae(cfg: Config, vcfg: RoseVAEConfig, device: torch.device, perturb: str | None = None) -> RoseVAE:
    """The untrained VAE of a config, its initial weights drawn from seed ``cfg.seed`` (+1 for LRatio's background)."""
    torch.manual_seed(cfg.seed + (0 if perturb is None else 1))
    return RoseVAE(vcfg).to(device)


# ---------------------------------------------------------------- the trial


@dataclass(frozen=True)
class Config(TrialConfig):
    method: str = "rose"
    ood: tuple[str, ...] = ("mnist", "notmnist", "omniglot", "gaussian_noise", "uniform_noise", "constant", "overall")
    val_ood: tuple[str, ...] = ("blobs",)  # every other offline set is a test set (or part of "overall")
    pad: bool = False  # zero-pad 28×28 to 32×32 (needs resize=False)
    resize: bool = True  # resize 28×28 sets to 32×32, bilinear (the authors' transforms.Resize(32); paper App. B)
    synth_at_input: bool = True  # noise / constant / blobs (and overall's) drawn at 32×32, as the authors
    # draw them; False: drawn at the ID set's 28×28 and resized with the natural sets
    epochs: int = 100  # VAE training epochs (paper: 100)
    hflip: bool = True  # mirror each training image with probability ½ (the authors' augment='hflip' VAEs)
    batch_size: int = 64  # paper: 64
    lr: float = 1e-3  # Adam, halved every 30 epochs (paper)
    # --- model ---
    width: int = 32  # n, first conv channels (paper: 32 FMNIST, 64 CIFAR-10)
    latent_dim: int = 100  # paper: 100 FMNIST, 200 CIFAR-10
    arch: str = "dcgan_bn"  # dcgan_bn: Likelihood Regret's DCGAN VAE (BatchNorm, separate μ / log σ² heads) | plain
    init: str = "dcgan"  # dcgan: N(0, 0.02) weights, BN γ ~ N(1, 0.02) (the authors' weights_init) | torch
    vae_cache: str = ""  # folder of trained VAEs keyed by training config ("" = train in memory)
    # --- scores (every one higher = more OOD) ---
    scores: tuple[str, ...] = ("rose_diag", "rose_ekfac", "nll")  # names from SCORES; "rose" uses `preconditioner`
    preconditioner: str = "ekfac"  # for the score "rose": "diag" | "ekfac"
    fisher_n: int = 10000  # ID training images the Fisher and z-scores are fitted on (authors: 10,000;
    # paper Fig. 5 varies it over 10…10K); at most the training set
    damping: float = 1e-8  # added to the Fisher's diagonal / eigenvalues (the authors' code: 1e-8, absolute)
    damping_relative: bool = False  # True: damping × the mean of F / Σ (e.g. with damping 1e-3)
    rose_z: str = "mean"  # latent in the ROSE gradient: mean (z = μ, the authors' num_samples = 1) | sample
    grad_batch: int | None = None  # images per per-sample-gradient pass (None: the device's best; 8 on CPU)
    iwae_k: int = 20  # IWAE samples for NLL, LR, LRatio, IC (paper: 20)
    lr_steps: int = 100  # Likelihood Regret: encoder re-optimisation steps per image
    lr_lr: float = 1e-4  # Likelihood Regret: Adam learning rate
    lr_n: int | None = None  # Likelihood Regret: score only the first lr_n images per set (None = all)
    lratio_perturbation: str = "random:0.3"  # LRatio background inputs (paper Table 2 FMNIST: random, μ=0.3)
    lratio_mu: float | None = None  # replaces the μ of a random:μ background: a number a search can range over
    lratio_l2: float = 0.0  # LRatio background λ of λ‖θ‖² added to the nats/dim loss, unscaled (paper: 0 or 10)
    rnd_perturbation: str = "svd:28"  # RND: "svd:K" | "dct:K" | "gb" | "random:μ"
    rnd_epochs: int = 5  # RND predictor training epochs

    def __post_init__(self) -> None:
        if isinstance(self.scores, str):
            object.__setattr__(self, "scores", tuple(s.strip() for s in self.scores.split(",") if s.strip()))
        super().__post_init__()
        bad = [s for s in self.scores if s not in SCORES]
        require([
            (len(self.scores) > 0 and not bad, f"scores must be a non-empty subset of {SCORES}; got unknown {bad}"),
            (len(set(self.scores)) == len(self.scores), f"scores listed twice: {self.scores}"),
            (self.preconditioner in PRECONDITIONERS,
             f"preconditioner must be one of {PRECONDITIONERS}; got {self.preconditioner!r}"),
            (self.width >= 1 and self.latent_dim >= 1, "width and latent_dim must be >= 1"),
            (self.fisher_n >= 2, f"fisher_n must be >= 2, got {self.fisher_n}"),
            (self.damping >= 0, f"damping must be >= 0, got {self.damping}"),
            (self.arch in ("dcgan_bn", "plain"), f"arch must be dcgan_bn or plain, got {self.arch!r}"),
            (self.init in INITS, f"init must be one of {INITS}, got {self.init!r}"),
            (not (self.pad and self.resize), "pad and resize are exclusive: set resize=False to zero-pad"),
            (self.rose_z in ("mean", "sample"), f"rose_z must be mean or sample, got {self.rose_z!r}"),
            (self.grad_batch is None or self.grad_batch >= 1, f"grad_batch must be >= 1, got {self.grad_batch}"),
            (self.iwae_k >= 1, f"iwae_k must be >= 1, got {self.iwae_k}"),
            (self.lr_steps >= 1 and self.lr_lr > 0, "lr_steps must be >= 1 and lr_lr > 0"),
            (self.lr_n is None or self.lr_n >= 1, f"lr_n must be >= 1, got {self.lr_n}"),
            (self.lratio_l2 >= 0, f"lratio_l2 must be >= 0, got {self.lratio_l2}"),
            (self.lratio_mu is None or (0 < self.lratio_mu <= 1 and self.lratio_perturbation.startswith("random:")),
             f"lratio_mu needs a random:μ lratio_perturbation and μ in (0, 1], got {self.lratio_mu} with "
             f"{self.lratio_perturbation!r}"),
            (self.rnd_epochs >= 1, f"rnd_epochs must be >= 1, got {self.rnd_epochs}"),
        ])
        for field in ("lratio_perturbation", "rnd_perturbation"):
            try:
                lb.parse_perturbation(getattr(self, field))
            except ValueError as e:
                raise ConfigError(f"{field}: {e}") from None

    @property
    def lratio_background(self) -> str:
        """The LRatio background perturbation: ``lratio_perturbation`` with ``lratio_mu`` as its μ when set."""
        return self.lratio_perturbation if self.lratio_mu is None else f"random:{self.lratio_mu:.6g}"

    def vae_config(self, shape: tuple[int, int, int]) -> RoseVAEConfig:
        """The paper's VAE for ID images of this (C, H, W); ConfigError when it does not fit them."""
        c, h, _ = shape
        try:
            return RoseVAEConfig(channels=c, size=h, width=self.width, latent_dim=self.latent_dim, arch=self.arch,
                                 init=self.init)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def check_data(self, sets: SetInfos) -> None:
        super().check_data(sets)
        c, h, w = sets[(self.id, "train")].shape
        self.vae_config((c, 32, 32) if self.resize else (c, h, w))

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["scores"] = ",".join(self.scores)
        return d

    def score_names(self) -> tuple[str, ...]:
        return self.scores

    def brightness_sets(self) -> list[str]:
        """OOD sets that carry a brightness= modifier; their AUROCs also get a mean and std."""
        return [o for o in self.ood if "brightness=" in o]

    def metric_names(self) -> list[str]:
        extra = [f"auroc_brightness_{w}_{s}" for s in self.scores for w in ("mean", "std")]
        if not self.brightness_sets():
            extra = []
        return super().metric_names() + extra


def input_sized_specs(cfg: Config, channels: int) -> dict[str, str]:
    """Eval-set key -> spec drawn at the VAE's 32×32 input, for every set that is drawn rather than
    loaded: synthetic test and validation sets without ``size=``, and ``overall`` (its noise and
    constant parts). Empty unless ``cfg.resize`` and ``cfg.synth_at_input``."""
    if not (cfg.resize and cfg.synth_at_input):
        return {}
    out = {}
    for split, specs in (("test", cfg.ood), ("val", cfg.val_ood)):
        for spec in specs:
            if data.takes_shape(spec):
                out[score_key(spec, split)] = data.at_shape(spec, (channels, 32, 32))
            elif data.base_name(spec) == "overall":
                out[score_key(spec, split)] = data.at_size(spec, 32)
    return out


class Experiment(BaseExperiment[Config]):
    """The paper's VAE (trained, or loaded from the cache, in the one training step), then every score.

    ``__init__`` loads the sets and builds the untrained VAE; ``train_epoch`` trains or loads it;
    ``score`` runs the named scoring steps (``score_rose``, ``score_likelihoods``, ``score_lr``,
    ``score_rnd``), each filling its scores into the per-set table."""

    cfg: Config

    def __init__(self, cfg: Config):
        self.train_x = self.start(cfg).x
        if cfg.resize:
            self.train_x = data.resize(self.train_x, 32)
            self.eval_sets = {k: replace(s, x=data.resize(s.x, 32)) for k, s in self.eval_sets.items()}
            for key, spec in input_sized_specs(cfg, self.train_x.shape[1]).items():
                s = data.load(spec, "test", device=self.device)
                self.eval_sets[key] = replace(s, x=s.x[: cfg.test_n], y=None if s.y is None else s.y[: cfg.test_n])
            self.test = {k: self.eval_sets[k] for k in self.test}
        c, h, w = self.train_x.shape[1:]
        self.model = new_vae(cfg, cfg.vae_config((c, h, w)), self.device)
        self.trained = False
        self.history: list[float] = []
        self.train_s = 0.0
        self.epoch = cfg.epochs - 1  # the VAE trains (or loads) in one step; the step's evaluation scores
        self.timings: dict[str, float] = {}

    def train_epoch(self) -> dict[str, float]:
        if not self.trained:
            t0 = time.perf_counter()
            try:
                self.model, self.history = ensure_vae(self.cfg, self.train_x, self.device)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            self.train_s, self.trained = time.perf_counter() - t0, True
        return {"loss": self.history[-1], "train_s": self.train_s}

    def _eps(self, n: int, salt: int, *shape: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + salt)
        return torch.randn(n, *shape, self.cfg.latent_dim, generator=g).to(self.device)

    def _rose_eps(self, n: int, salt: int) -> torch.Tensor:
        """The ROSE gradient's noise: zeros for z = μ (``rose_z="mean"``), else one fixed sample per image."""
        eps = self._eps(n, salt)
        return torch.zeros_like(eps) if self.cfg.rose_z == "mean" else eps

    def rose_kinds(self) -> tuple[str, ...]:
        """Preconditioners the configured scores need: ``rose_diag``/``rose_ekfac`` and ``rose``'s."""
        cfg = self.cfg
        kinds = {s.removeprefix("rose_") for s in cfg.scores if s.startswith("rose_")}
        return tuple(sorted(kinds | ({cfg.preconditioner} if "rose" in cfg.scores else set())))

    def fisher_images(self) -> torch.Tensor:
        """``fisher_n`` ID training images drawn without replacement (seed + 7), uint8 on the device."""
        gen = torch.Generator().manual_seed(self.cfg.seed + 7)
        order = torch.randperm(len(self.train_x), generator=gen)[: self.cfg.fisher_n]
        return self.train_x[order.to(self.device)]

    def score_rose(self, out: dict[str, dict[str, torch.Tensor]]) -> None:
        """Fit every needed preconditioner on ``fisher_images`` (Algorithm 1), then ROSE of every set."""
        cfg, kinds = self.cfg, self.rose_kinds()
        if not kinds:
            return
        t0 = time.perf_counter()
        fx = self.fisher_images()
        fits = fit_rose(self.model, fx, self._rose_eps(len(fx), 1), kinds, cfg.grad_batch, cfg.damping,
                        cfg.damping_relative)
        self.timings["rose_fit_s"] = time.perf_counter() - t0
        t0, n = time.perf_counter(), 0
        for name, s in self.eval_sets.items():
            r = rose_scores(self.model, s.x, self._rose_eps(len(s), 2), fits, cfg.grad_batch)
            n += len(s)
            for k, v in r.items():
                if f"rose_{k}" in cfg.scores:
                    out[name][f"rose_{k}"] = v
                if "rose" in cfg.scores and k == cfg.preconditioner:
                    out[name]["rose"] = v
        self.timings["rose_img_per_s"] = n / (time.perf_counter() - t0)

    def score_likelihoods(self, out: dict[str, dict[str, torch.Tensor]]) -> None:
        """IWAE NLL in bits/dim and the scores built on it: LRatio (− log-likelihood ratio to a
        background VAE) and Input Complexity (NLL − compressed bits/dim)."""
        cfg = self.cfg
        if not {"nll", "lratio", "ic_png", "ic_jp2"} & set(cfg.scores):
            return
        bg = None
        if "lratio" in cfg.scores:
            bg, _ = ensure_vae(cfg, self.train_x, self.device, perturb=cfg.lratio_background, l2=cfg.lratio_l2)
        for name, s in self.eval_sets.items():
            eps = self._eps(len(s), 3, cfg.iwae_k)
            nll = lb.iwae_bpd(self.model, s.x, eps)  # (N,) bits/dim
            if "nll" in cfg.scores:
                out[name]["nll"] = nll
            if bg is not None:
                out[name]["lratio"] = nll - lb.iwae_bpd(bg, s.x, eps)  # −LLR in bits/dim
            for codec in ("png", "jp2"):
                if f"ic_{codec}" in cfg.scores:
                    out[name][f"ic_{codec}"] = nll - lb.complexity_bpd(s.x, codec).to(nll.device)

    def score_lr(self, out: dict[str, dict[str, torch.Tensor]]) -> None:
        """Likelihood Regret of the first ``lr_n`` images of every set (all with ``lr_n`` None)."""
        cfg = self.cfg
        if "lr" not in cfg.scores:
            return
        for name, s in self.eval_sets.items():
            xs = s.x[: cfg.lr_n] if cfg.lr_n else s.x
            out[name]["lr"] = lb.likelihood_regret_batched(
                self.model, xs, self._eps(len(xs), 4, cfg.lr_steps), self._eps(len(xs), 5, cfg.iwae_k), lr=cfg.lr_lr)

    def score_rnd(self, out: dict[str, dict[str, torch.Tensor]]) -> None:
        """RND: a predictor trained on the ID images and their perturbation; its distance to the target net."""
        cfg = self.cfg
        if "rnd" not in cfg.scores:
            return
        rnd = lb.train_rnd(self.train_x, cfg.rnd_perturbation, cfg.rnd_epochs, cfg.batch_size, cfg.seed)
        for name, s in self.eval_sets.items():
            out[name]["rnd"] = lb.rnd_score(rnd, s.x)

    def score(self) -> Scores:
        out: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.eval_sets}
        for step in (self.score_rose, self.score_likelihoods, self.score_lr, self.score_rnd):
            step(out)
        return {name: {k: v.detach().cpu().numpy().astype(np.float64) for k, v in d.items()} for name, d in out.items()}

    def evaluate(self) -> tuple[dict[str, float], Scores]:
        """The metric table, plus AUROC mean/std over brightness-modified sets and timings."""
        scores = self.score()
        table = evaluation_table(scores, self.cfg)
        bsets = self.cfg.brightness_sets()
        for s in self.cfg.scores if bsets else ():
            vals = np.array([table[f"auroc_{set_key(o)}_{s}"] for o in bsets])
            table[f"auroc_brightness_mean_{s}"] = float(vals.mean())
            table[f"auroc_brightness_std_{s}"] = float(vals.std())
        table.update({f"time_{k}": v for k, v in self.timings.items()})
        return table, scores

    def write_artifacts(self, folder: Path) -> None:
        (folder / "vae_history.json").write_text(json.dumps({"loss": self.history, "train_s": self.train_s,
                                                             **self.timings}, indent=1))

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "epoch": self.epoch, "history": torch.tensor(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.model.eval()
        self.epoch = int(state["epoch"])
        self.history = [float(v) for v in state["history"]]
        self.trained = True

