"""Negative-sampling VAE training (Csiszárik et al., paper 000, §III).

Inliers x maximise the ELBO under the standard prior p(z) = N(0, I); negatives x̄ have
their approximate posterior pushed towards the negative prior p̄(z) = N(shift·1, I)
(§III-A):

    L_np = E_x[ −ELBO(x) ] + w · E_x̄[ KL( q(z|x̄) || p̄(z) ) ]

The added term is non-negative, so L_np still upper-bounds the inliers' NLL; it trains
the encoder to separate inliers and outliers in latent space. ``w`` is ``neg_weight``.
With no negatives this is the plain VAE baseline. Scores: BPD and KL (and IWAE).

``eubo=True`` replaces the KL term by the evidence upper bound of the negatives (§III-B),
so their likelihood is pushed down directly: L = E_x[−ELBO(x)] + w · E_x̄[EUBO(x̄)].

Sources of negatives x̄ (§III-C, §IV-C, Table III), the ``negatives`` config value:

* ``aux``            an auxiliary dataset (``aux``, e.g. notMNIST)
* ``gaussian_noise`` / ``uniform_noise``  fixed synthetic sets of ``oodlab.data`` at the ID shape
* ``random``         fresh images, every pixel uniform on [0, 1] (the paper's "random")
* ``inlier_noise``   the inlier batch plus N(0, noise_sigma²) noise, clipped (paper: σ = 0.25)
* ``adversarial``    the VAE's own samples x̂ = E[p(x|z)], z ~ N(0, I) (§III-D). Encoder
  and decoder are updated in alternation with separate optimizers: the encoder step
  minimises −ELBO(x) + w·KL(q(z|x̂) || p̄(z)) over encoder weights (x̂ detached); the
  decoder step minimises −ELBO(x) + adv_weight·KL(q(z|x̂) || p(z)) over decoder weights,
  the gradient flowing through the (not updated) encoder into the generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oodlab import data
from oodlab.experiment import (
    ConfigError,
    EpochMeans,
    Scores,
    SetInfos,
    TrialConfig,
    auto_arch,
    descend,
    require,
    same_shape,
    score_sets,
    set_key,
)
from oodlab.experiment import Experiment as BaseExperiment
from oodlab.fusion import Stack
from oodlab.models.vae import ARCHS, DECODERS, VAE, VAEConfig, build_vae
from oodlab.scores import elbo_terms, score_batch
from oodlab.vae_math import iwae_log_weights, kl_to_normal, sample_k

NEGATIVES = ("none", "aux", "gaussian_noise", "uniform_noise", "random", "inlier_noise", "adversarial")
SYNTHETIC = ("gaussian_noise", "uniform_noise")  # negatives loaded as fixed sets from oodlab.data
OPTIMIZERS = ("rmsprop", "adam")


# ---------------------------------------------------------------- losses (pure functions)

def eubo(model: VAE, x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Evidence upper bound of paper 000 §III-B, per sample (B,), in nats.

    EUBO = E_{p(z|x)}[log w], w = p(x, z) / q(z|x). The paper's loss E_q[w log w] is
    p(x)·EUBO; dividing by the importance-sampling estimate of p(x) = E_q[w] gives the
    self-normalised estimate Σ_i softmax(log w)_i · log w_i with z_i ~ q(z|x), which never
    exponentiates a raw log-weight. It is ≥ the IWAE bound on the same samples.
    """
    mu, logvar = model.encode(x)
    z, mu_k, logvar_k = sample_k(mu, logvar, k, generator)
    log_w = iwae_log_weights(model.log_px(x.repeat_interleave(k, 0), model.decode(z)), z, mu_k, logvar_k)
    log_w = log_w.view(len(x), k)
    return (torch.softmax(log_w, dim=1) * log_w).sum(1)


def loss(model: VAE, x: torch.Tensor, x_neg: torch.Tensor | None, shift: float, neg_weight: float,
         use_eubo: bool = False, eubo_k: int = 8, eps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Batch-mean loss and its parts (scalars): ``loss``, ``nelbo``, ``kl``, and ``neg_kl`` or ``neg_eubo``;
    ``eps``: the inliers' reparameterisation noise (B, latent_dim), drawn by the caller."""
    t = elbo_terms(model, x, eps=eps)
    nelbo = -t["elbo"].mean()
    out = {"nelbo": nelbo, "kl": t["kl"].mean(), "loss": nelbo}
    if x_neg is not None:
        if use_eubo:
            out["neg_eubo"] = eubo(model, x_neg, eubo_k).mean()
        else:
            mu, logvar = model.encode(x_neg)
            out["neg_kl"] = kl_to_normal(mu, logvar, mean=shift).mean()
        out["loss"] = nelbo + neg_weight * (out["neg_eubo"] if use_eubo else out["neg_kl"])
    return out


def generate(model: VAE, z: torch.Tensor) -> torch.Tensor:
    """The generator's images x̂ = E[p(x|z)] = sigmoid(decoder logits) for both noise models; (B, C, H, W)."""
    return torch.sigmoid(model.decode(z))


def decoder_loss(model: VAE, x: torch.Tensor, z: torch.Tensor, adv_weight: float) -> dict[str, torch.Tensor]:
    """Decoder step of the adversarial scheme (§III-D): −ELBO(x) + adv_weight · L_adv.

    L_adv = KL(q(z|x̂) || p(z)) with x̂ = generate(z), z ~ p(z): the generator is rewarded
    for samples the encoder maps into the standard prior.
    """
    t = elbo_terms(model, x)
    nelbo = -t["elbo"].mean()
    mu, logvar = model.encode(generate(model, z))
    adv_kl = kl_to_normal(mu, logvar).mean()
    return {"dec_nelbo": nelbo, "adv_kl": adv_kl, "dec_loss": nelbo + adv_weight * adv_kl}


def step_on(opt: torch.optim.Optimizer, params: list[nn.Parameter], objective: torch.Tensor) -> None:
    """One optimizer step on ``params`` only: gradients of the others are neither computed nor applied."""
    grads = torch.autograd.grad(objective, params, allow_unused=True)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    for p in params:
        p.grad = None


def encoder_step(model: VAE, opt_enc: torch.optim.Optimizer, x: torch.Tensor, z: torch.Tensor,
                 cfg: Config) -> dict[str, torch.Tensor]:
    """Adversarial scheme, encoder update: the generator's samples x̂ = generate(z) are negatives (detached)."""
    with torch.no_grad():
        x_gen = generate(model, z)
    parts = loss(model, x, x_gen, cfg.shift, cfg.neg_weight, cfg.eubo, cfg.eubo_k)
    step_on(opt_enc, model.encoder_parameters(), parts["loss"])
    return parts


def decoder_step(model: VAE, opt_dec: torch.optim.Optimizer, x: torch.Tensor, z: torch.Tensor,
                 cfg: Config) -> dict[str, torch.Tensor]:
    """Adversarial scheme, decoder update: −ELBO(x) + adv_weight · KL(q(z|x̂) || p(z)) over decoder weights."""
    parts = decoder_loss(model, x, z, cfg.adv_weight)
    step_on(opt_dec, model.decoder_parameters(), parts["dec_loss"])
    return parts


def adversarial_step(model: VAE, opt_enc: torch.optim.Optimizer, opt_dec: torch.optim.Optimizer, x: torch.Tensor,
                     z_enc: torch.Tensor, z_dec: torch.Tensor, cfg: Config) -> dict[str, torch.Tensor]:
    """Encoder step, then decoder step, on one inlier batch (the paper's alternating updates)."""
    return {**encoder_step(model, opt_enc, x, z_enc, cfg), **decoder_step(model, opt_dec, x, z_dec, cfg)}


# ---------------------------------------------------------------- config

def _base(spec: str) -> str:
    return spec.split("[", 1)[0].strip()


@dataclass(frozen=True)
class Config(TrialConfig):
    # Validation OOD sets, the first is a study's default target. `constant` first: with the
    # BPD score `blobs` saturates (AUROC >= 0.999 for every trial, negatives or not, of the
    # 10-epoch Table I study), while `constant` ranks aux negatives above none as the MNIST test
    # does (docs/validation.md).
    val_ood: tuple[str, ...] = ("constant", "blobs")
    # --- model ---
    arch: str = "auto"  # "gray" | "color" | "auto" (color for 3-channel data)
    decoder: str = "bernoulli"  # noise model: "bernoulli" | "gaussian"
    latent_dim: int = 10  # paper 000: 10
    optimizer: str = "rmsprop"  # paper 000: RMSProp for gray, Adam for color
    spectral_norm: bool = False  # spectral norm on the encoder's convolutions (paper: color + adversarial)
    # --- negatives ---
    negatives: str = "none"  # one of NEGATIVES; "none" = baseline VAE
    aux: str = "notmnist"  # auxiliary negative set (paper: EMNIST-Letters for Fashion-MNIST)
    aux_split: str = "test"  # split of the aux set to draw negatives from (offline notMNIST has only "test")
    shift: float = 8.0  # negative prior N(shift·1, I); paper: 8 gray, 25 color
    neg_weight: float = 1.0  # weight of the negatives' term (KL to p̄, or EUBO)
    noise_sigma: float = 0.25  # σ of the additive noise of "inlier_noise" (paper Table III: 0.25)
    adv_weight: float = 1.0  # weight of L_adv in the adversarial decoder step
    eubo: bool = False  # negatives' term: EUBO (§III-B) instead of KL to the negative prior
    eubo_k: int = 8  # importance samples of the EUBO estimate
    iwae_k: int = 0  # also score the IWAE bound with k samples (0 = off)

    def __post_init__(self) -> None:
        super().__post_init__()
        ood_bases = {_base(s) for s in self.ood}
        leaks = {"gaussian_noise": {"gaussian_noise"}, "uniform_noise": {"uniform_noise"}, "random": {"uniform_noise"}}
        require([
            (self.arch in ("auto", *ARCHS), f"arch must be one of auto, {', '.join(ARCHS)}; got {self.arch!r}"),
            (self.decoder in DECODERS, f"decoder must be one of {', '.join(DECODERS)}; got {self.decoder!r}"),
            (self.negatives in NEGATIVES, f"negatives must be one of {NEGATIVES}; got {self.negatives!r}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}"),
            (self.aux_split in ("train", "test"), f"aux_split must be train or test; got {self.aux_split!r}"),
            (self.negatives != "aux" or set_key(self.aux) not in {set_key(s) for s in self.ood},
             f"aux set {self.aux!r} is also an OOD test set: negatives would leak into evaluation"),
            (not leaks.get(self.negatives, set()) & ood_bases,
             f"negatives {self.negatives!r} come from the same distribution as OOD set(s) {sorted(ood_bases)}: "
             "they would leak into evaluation"),
            (self.latent_dim >= 1, f"latent_dim must be >= 1, got {self.latent_dim}"),
            (0 <= self.shift <= 1000, f"shift must be in [0, 1000], got {self.shift}"),
            (self.neg_weight >= 0, f"neg_weight must be >= 0, got {self.neg_weight}"),
            (self.adv_weight >= 0, f"adv_weight must be >= 0, got {self.adv_weight}"),
            (0 < self.noise_sigma <= 10, f"noise_sigma must be in (0, 10], got {self.noise_sigma}"),
            (isinstance(self.eubo, bool), f"eubo must be true or false, got {self.eubo!r}"),
            (isinstance(self.spectral_norm, bool), f"spectral_norm must be true or false, got {self.spectral_norm!r}"),
            (self.eubo_k >= 1, f"eubo_k must be >= 1, got {self.eubo_k}"),
            (self.iwae_k >= 0, f"iwae_k must be >= 0, got {self.iwae_k}"),
        ])

    def score_names(self) -> tuple[str, ...]:
        return ("bpd", "kl", "iwae") if self.iwae_k > 0 else ("bpd", "kl")

    def training_sets(self) -> list[str]:
        """The aux set, or the noise distribution the negatives are drawn from ("random" is uniform noise)."""
        return {"aux": [self.aux], "gaussian_noise": ["gaussian_noise"], "uniform_noise": ["uniform_noise"],
                "random": ["uniform_noise"]}.get(self.negatives, [])

    def check_data(self, sets: SetInfos) -> None:
        super().check_data(sets)
        shape = sets[(self.id, "train")].shape
        if self.negatives == "aux":
            same_shape(f"aux {self.aux}", sets[(self.aux, self.aux_split)].shape, shape)
        self.vae_config(shape)

    def vae_config(self, shape: tuple[int, int, int]) -> VAEConfig:
        """The VAE for ID images of this (C, H, W); ConfigError when the architecture does not fit them."""
        c, h, _ = shape
        try:
            return VAEConfig(arch=auto_arch(self.arch, c), decoder=self.decoder, channels=c, size=h,
                             latent_dim=self.latent_dim)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def data_requests(self) -> list[tuple[str, str]]:
        extra = {"aux": [(self.aux, self.aux_split)], **{s: [(s, "train")] for s in SYNTHETIC}}
        return super().data_requests() + extra.get(self.negatives, [])


def noise_spec(name: str, shape: tuple[int, int, int]) -> str:
    """Spec of a synthetic negative set at the ID shape (C, H, W), e.g. ``gaussian_noise[channels=1,size=32]``."""
    c, h, _ = shape
    return f"{name}[channels={c},size={h}]"


# ---------------------------------------------------------------- experiment

class Experiment(BaseExperiment[Config]):
    """Data on device, VAE, optimizer(s) and progress of one negative-sampling trial."""

    def __init__(self, cfg: Config):
        train = self.start(cfg)
        self.train_x = train.x  # (N, C, H, W) uint8 on device
        c, h, w = self.train_x.shape[1:]
        shape = (c, h, w)
        self.aux_x: torch.Tensor | None = None  # fixed set of negatives (aux or synthetic noise), uint8 on device
        if cfg.negatives == "aux":
            self.aux_x = data.load(cfg.aux, cfg.aux_split, pad_to=32 if cfg.pad else None, device=self.device).x
        elif cfg.negatives in SYNTHETIC:
            self.aux_x = data.load(noise_spec(cfg.negatives, shape), "train", device=self.device).x
        if self.aux_x is not None:
            same_shape(f"aux {cfg.aux}", self.aux_x.shape[1:], shape)
        self.model = build_vae(cfg.vae_config(shape)).to(self.device)
        if cfg.spectral_norm:
            for m in self.model.encoder.modules():
                if isinstance(m, nn.Conv2d):
                    nn.utils.parametrizations.spectral_norm(m)
        opt = torch.optim.RMSprop if cfg.optimizer == "rmsprop" else torch.optim.Adam
        self.opt: torch.optim.Optimizer
        self.opt_dec: torch.optim.Optimizer | None = None
        if cfg.negatives == "adversarial":  # alternating steps: one optimizer per network
            self.opt = opt(self.model.encoder_parameters(), lr=cfg.lr)
            self.opt_dec = opt(self.model.decoder_parameters(), lr=cfg.lr)
        else:
            self.opt = opt(self.model.parameters(), lr=cfg.lr)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # batch order and negative draws

    def negatives_batch(self, x: torch.Tensor) -> torch.Tensor | None:
        """Negatives for one inlier batch x (float, [0,1]), drawn with ``self.gen``; None for the baseline."""
        cfg, n = self.cfg, len(x)
        if self.aux_x is not None:
            j = torch.randint(len(self.aux_x), (n,), generator=self.gen).to(self.device)
            return data.to_float(self.aux_x[j])
        if cfg.negatives == "random":
            return torch.rand(x.shape, generator=self.gen).to(self.device)
        if cfg.negatives == "inlier_noise":
            return (x + cfg.noise_sigma * torch.randn(x.shape, generator=self.gen).to(self.device)).clamp(0, 1)
        return None

    def latents(self, n: int) -> torch.Tensor:
        """z ~ N(0, I) for the generator, or the ε of the inliers' z = μ + ε·σ; (n, latent_dim), drawn
        with ``self.gen`` so a replicate's every draw follows its own seed, fused or not."""
        return torch.randn(n, self.cfg.latent_dim, generator=self.gen).to(self.device)

    def draws(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One step's inputs, in the order they are drawn from ``self.gen``: inliers, negatives, ε."""
        x = data.to_float(self.train_x[idx])
        return x, self.negatives_batch(x), self.latents(len(idx))

    def fuse(self, members: list[Experiment]) -> FusedTraining | None:
        """Replicates of this configuration trained as one batched model, or None where the model does
        not allow it: the adversarial scheme (two optimizers over parameter subsets), EUBO (its
        importance draws), spectral norm (parametrised weights) and the color architecture (BatchNorm
        statistics are buffers updated in place) train looped."""
        cfg = self.cfg
        if cfg.negatives == "adversarial" or cfg.eubo or cfg.spectral_norm or self.model.cfg.arch != "gray":
            return None
        return FusedTraining(members)

    def train_epoch(self) -> dict[str, float]:
        """One pass over the ID training set; returns mean loss terms."""
        cfg, model = self.cfg, self.model
        model.train()

        def step(idx: torch.Tensor) -> dict[str, torch.Tensor]:
            if cfg.negatives == "adversarial":  # two optimisers: the step makes its own updates
                assert self.opt_dec is not None  # built for the adversarial scheme in __init__
                x = data.to_float(self.train_x[idx])
                return adversarial_step(
                    model, self.opt, self.opt_dec, x, self.latents(len(idx)), self.latents(len(idx)), cfg
                )
            x, x_neg, eps = self.draws(idx)
            return loss(model, x, x_neg, cfg.shift, cfg.neg_weight, cfg.eubo, cfg.eubo_k, eps)

        return self.shuffled_epoch(step, None if cfg.negatives == "adversarial" else self.opt)

    @torch.no_grad()
    def score(self) -> Scores:
        self.model.eval()
        gen = self.score_generator()
        return score_sets(
            self.eval_sets, self.cfg.eval_batch_size, lambda x: score_batch(self.model, x, self.cfg.iwae_k, gen)
        )

    @torch.no_grad()
    def write_artifacts(self, folder: Path) -> None:
        """``samples.png``: 64 generated images; ``negatives.png``: 64 negatives of the configured source."""
        from torchvision.utils import save_image

        self.model.eval()
        g = torch.Generator().manual_seed(self.cfg.seed + 2)
        z = torch.randn(64, self.cfg.latent_dim, generator=g).to(self.device)
        save_image(generate(self.model, z).cpu(), folder / "samples.png", nrow=8)
        if self.cfg.negatives == "adversarial":
            return
        x = data.to_float(self.train_x[:64])
        saved = self.gen.get_state()  # drawing the figure's negatives must not shift training's stream
        neg = self.negatives_batch(x)
        self.gen.set_state(saved)
        if neg is not None:
            save_image(neg.cpu(), folder / "negatives.png", nrow=8)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue mid-trial; loadable with ``torch.load(weights_only=True)``."""
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "epoch": self.epoch,
                 "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state()}
        if self.opt_dec is not None:
            state["opt_dec"] = self.opt_dec.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        if self.opt_dec is not None:
            self.opt_dec.load_state_dict(state["opt_dec"])
        self.epoch = int(state["epoch"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])


class FusedTraining:
    """Replicates of one gray-VAE configuration trained as one batched model (``oodlab.fusion``): every
    replicate draws its batch order, negatives and ε from its own generator in the order a looped
    replicate does, so fused and looped training give the same losses up to float rounding."""

    def __init__(self, members: list[Experiment]) -> None:
        self.members = members
        cfg = members[0].cfg
        make = torch.optim.RMSprop if cfg.optimizer == "rmsprop" else torch.optim.Adam
        self.stack = Stack([m.model for m in members], [m.opt for m in members],
                           lambda params: make(params, lr=cfg.lr))

    def train_epoch(self) -> list[dict[str, float]]:
        cfg, ms = self.members[0].cfg, self.members
        for m in ms:
            m.model.train()

        def objective(model: VAE, x: torch.Tensor, x_neg: torch.Tensor | None,
                      eps: torch.Tensor) -> dict[str, torch.Tensor]:
            return loss(model, x, x_neg, cfg.shift, cfg.neg_weight, eps=eps)

        orders = [data.batch_indices(len(m.train_x), cfg.batch_size, shuffle=True, generator=m.gen, device=m.device)
                  for m in ms]
        means = [EpochMeans() for _ in ms]
        for idxs in zip(*orders):
            x, x_neg, eps = zip(*(m.draws(idx) for m, idx in zip(ms, idxs)))
            negs = None if x_neg[0] is None else torch.stack(x_neg)
            parts = self.stack.vmap(objective, torch.stack(x), negs, torch.stack(eps))
            descend(self.stack.opt, parts["loss"].sum())  # the sum gives each replicate its own gradient
            for i, mean in enumerate(means):
                mean.add({k: v[i] for k, v in parts.items()})
        return [mean.means(ms[0].epoch + 1) for mean in means]

    def sync_out(self) -> None:
        self.stack.sync_out()

    def sync_in(self) -> None:
        self.stack.sync_in()
