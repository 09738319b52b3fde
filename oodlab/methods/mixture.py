"""Mixture priors against the OOD likelihood problem (Kamoi & Kobayashi, papers 001/003).

The standard prior N(0, I) is replaced by an untrainable uniform mixture
p(z) = (1/K) Σ_i p_i(z) of unit-variance Gaussian or generalized-Gaussian (β) components
placed d apart (``oodlab.mixture_priors``). Before training every ID image is assigned a
component, by class label or by k-means on its pixels (§4); during training its latent
is pulled to that component only:

    L(x) = −E_q[log p(x|z)] + KL( q(z|x) || p_{c(x)} )

while test likelihoods use the full mixture, estimated by importance sampling with the
encoder as proposal (Appendix B, 5000 samples in the paper; ``is_samples`` here):

    log p(x) ≈ logsumexp_k [ log p(x|z_k) + log p(z_k) − log q(z_k|x) ] − log k

With ``model="glow"`` (``oodlab.models.glow``, paper Appendix B) the flow maps the
dequantized image to z of full dimension D = C·H·W; each training image maximizes
log p_{c(x)}(z) + log|det ∂z/∂x| (its own component), and the test likelihood is exact:

    −log p(x) = −(log p_mix(z) + log|det ∂z/∂x|) + D log 256     (no importance sampling)

Score ``nll`` = −log p(x) in nats (higher = more OOD). Evaluation also reports the
mean NLL of every set and the OOD-minus-ID gap (``nll_gap_<ood>``; paper Table 1 gives
MNIST's mean NLL). ``components=1`` is the standard-prior baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodlab import data
from oodlab.experiment import (
    ConfigError,
    Scores,
    SetInfos,
    TrialConfig,
    auto_arch,
    labels_of,
    require,
    set_key,
)
from oodlab.experiment import Experiment as BaseExperiment
from oodlab.mixture_priors import FAMILIES, MixturePrior, check_components
from oodlab.models import glow
from oodlab.models.mixture_vae import ARCHS, CatVAE, CatVAEConfig
from oodlab.plots import pyplot
from oodlab.vae_math import bits_per_dim, iwae_log_weights, log_mean_exp, reparameterize, sample_k

MODELS = ("vae", "glow")
ASSIGNMENTS = ("labels", "kmeans")


# ---------------------------------------------------------------- pure pieces

def check_one_component_per_class(classes: tuple[int, ...], components: int) -> None:
    if len(classes) != components:
        raise ConfigError(f"assignment=labels needs one component per class: the ID training set has "
                          f"{len(classes)} classes {list(classes)} but components={components}")


def assign_by_labels(y: torch.Tensor, components: int) -> torch.Tensor:
    """Component of each image = rank of its label among the sorted distinct labels."""
    classes = torch.unique(y)  # sorted
    check_one_component_per_class(tuple(classes.tolist()), components)
    return torch.searchsorted(classes, y)


def assign_by_kmeans(x: torch.Tensor, components: int, seed: int) -> torch.Tensor:
    """k-means (scikit-learn, k-means++ init, as paper Appendix E) on flattened [0,1] pixels."""
    from sklearn.cluster import KMeans

    flat = data.to_float(x).flatten(1).cpu().numpy()
    km = KMeans(n_clusters=components, n_init=4, random_state=seed).fit(flat)
    return torch.from_numpy(km.labels_.astype(np.int64)).to(x.device)


def loss(model: CatVAE, prior: MixturePrior, x: torch.Tensor, comp: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch-mean negative ELBO with each image's own component as prior; parts as scalars."""
    mu, logvar = model.encode(x)
    z = reparameterize(mu, logvar)
    rec = model.log_px(x, model.decode(z))
    kl = prior.kl_assigned(mu, logvar, z, comp)
    nelbo = (kl - rec).mean()
    return {"loss": nelbo, "rec": -rec.mean(), "kl": kl.mean()}


def glow_loss(model: glow.Glow, prior: MixturePrior, x: torch.Tensor, comp: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch-mean −log p(x) (nats, discrete bound) with each image's own component as prior;
    ``bpd`` is the same in bits per dimension. x: uint8 (B, C, H, W)."""
    z, logdet = model(glow.dequantize(x))
    nll = -glow.log_px(prior.log_prob_assigned(z, comp), logdet, model.dims).mean()
    return {"loss": nll, "bpd": bits_per_dim(nll, model.dims), "logdet": logdet.mean()}


@torch.no_grad()
def glow_log_likelihood(model: glow.Glow, prior: MixturePrior, x: torch.Tensor,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x) under the full mixture prior (one dequantization draw) and z; x uint8 -> (B,), (B, D)."""
    z, logdet = model(glow.dequantize(x, generator))
    return glow.log_px(prior.log_prob(z), logdet, model.dims), z


@torch.no_grad()
def is_log_likelihood(model: CatVAE, prior: MixturePrior, x: torch.Tensor, k: int,
                      generator: torch.Generator | None = None, max_rows: int = 2048) -> torch.Tensor:
    """Importance-sampled log p(x) under the full mixture prior, k samples from q(z|x); (B,).

    Images are processed in groups so one decoder call sees at most ``max_rows`` latents.
    """
    out = []
    group = max(1, max_rows // k)
    for i in range(0, len(x), group):
        xb = x[i : i + group]
        mu, logvar = model.encode(xb)
        z, mu_k, logvar_k = sample_k(mu, logvar, k, generator)
        log_px = model.log_px(xb.repeat_interleave(k, 0), model.decode(z))
        log_w = iwae_log_weights(log_px, z, mu_k, logvar_k, log_pz=prior.log_prob(z))
        out.append(log_mean_exp(log_w.view(len(xb), k), dim=1))
    return torch.cat(out)


def nll_summary(scores: Scores, oods: tuple[str, ...]) -> dict[str, float]:
    """Mean NLL of the ID test set and of each OOD set, and each OOD-minus-ID gap (nats)."""
    mean_id = float(np.mean(scores["id"]["nll"]))
    out = {"nll_mean_id": mean_id}
    for spec in oods:
        m = float(np.mean(scores[set_key(spec)]["nll"]))
        out[f"nll_mean_{set_key(spec)}"] = m
        out[f"nll_gap_{set_key(spec)}"] = m - mean_id
    return out


def nll_by_component_figure(scores: Scores, comps: dict[str, np.ndarray], k: int, path: Path) -> None:
    """One panel per prior component: NLL histograms of ID test vs each OOD set, each image
    counted under the component nearest its posterior mean (paper Fig. 4 / 14, split by mode)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, k, figsize=(4.5 * k, 3.5), squeeze=False)
    values = np.concatenate([d["nll"] for d in scores.values()])
    lo, hi = np.percentile(values, [0.5, 99.5])
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 50)
    for i, ax in enumerate(axes[0]):
        for name, d in scores.items():
            sel = d["nll"][comps[name] == i]
            ax.hist(np.clip(sel, lo, hi), bins=bins, alpha=0.5, label=f"{name} (n={sel.size})")
        ax.set(title=f"component {i}", xlabel="NLL (nats, higher = more OOD)", ylabel="images")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def latent_axis_figure(axis0: dict[str, np.ndarray], path: Path) -> None:
    """Histogram of the posterior means' first coordinate per set (paper Fig. 5 / 17)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, v in axis0.items():
        ax.hist(v, bins=60, alpha=0.5, density=True, label=name)
    ax.set(title="latent axis 0 (VAE: posterior mean; Glow: z)", xlabel="z_0")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- config + experiment

@dataclass(frozen=True)
class Config(TrialConfig):
    method: str = "mixture"
    id: str = "fashion_mnist[labels=1,7]"  # paper §5.3: Trouser and Sneaker
    val_n: int = 1000  # of the 12,000 training images of classes 1 and 7
    val_ood: tuple[str, ...] = ("blobs", "fashion_mnist[labels=0,2-6,8,9]")  # blobs; the ID set's other classes
    lr: float = 1e-3  # paper: Adam(β1=0.5, β2=0.9), constant 1e-3
    # --- model ---
    model: str = "vae"  # "vae" (Table 2/3 with 256-way categorical decoder) | "glow" (Appendix B)
    arch: str = "auto"  # "gray" (Table 2) | "color" (Table 3) | "auto" (color for 3-channel data)
    latent_dim: int = 50  # VAE latent size (paper: 50 gray, 100 color); Glow's z has C·H·W dims
    glow_steps: int = 8  # Glow flow steps (paper: 32 for Fashion-MNIST, 24 for CIFAR-10)
    glow_hidden: int = 64  # Glow coupling-network width (OpenAI code: 512)
    glow_squeezes: int = 2  # Glow squeezes spread over the steps (paper: 2 for 28×28, 3 for 32×32)
    # --- prior ---
    family: str = "gaussian"  # component family: "gaussian" | "gen_gaussian"
    beta: float = 4.0  # generalized-Gaussian shape (paper: 4); unused for gaussian
    components: int = 2  # K; 1 = standard N(0, I) prior (the baseline)
    distance: float = 150.0  # d: means ±d/2·e_1 (K = 2), d·e_i or d·i·e_1 (K > 2); paper: VAE 150, Glow 100 (K=4: 200)
    layout: str = "auto"  # K > 2 means: axes (d·e_i) | line ([d·i, 0, …]) | auto (paper §5.4: VAE axes, Glow line)
    assignment: str = "labels"  # how training images get components: "labels" | "kmeans"
    # --- evaluation ---
    is_samples: int = 64  # importance samples per test image (paper: 5000)
    is_max_rows: int = 2048  # latents per decoder call during importance sampling (memory knob)

    def __post_init__(self) -> None:
        super().__post_init__()
        require([
            (self.model in MODELS, f"model must be one of {MODELS}; got {self.model!r}"),
            (self.arch in ("auto", *ARCHS), f"arch must be one of auto, {', '.join(ARCHS)}; got {self.arch!r}"),
            (self.family in FAMILIES, f"family must be one of {FAMILIES}; got {self.family!r}"),
            (self.assignment in ASSIGNMENTS, f"assignment must be one of {ASSIGNMENTS}; got {self.assignment!r}"),
            (self.latent_dim >= 1, f"latent_dim must be >= 1, got {self.latent_dim}"),
            (0.1 <= self.beta <= 100, f"beta must be in [0.1, 100], got {self.beta}"),
            (self.components >= 1, f"components must be >= 1, got {self.components}"),
            (self.glow_steps >= 1, f"glow_steps must be >= 1, got {self.glow_steps}"),
            (self.glow_hidden >= 1, f"glow_hidden must be >= 1, got {self.glow_hidden}"),
            (1 <= self.glow_squeezes <= 4, f"glow_squeezes must be in 1..4, got {self.glow_squeezes}"),
            (self.layout in ("auto", "axes", "line"), f"layout must be auto, axes or line; got {self.layout!r}"),
            (0 <= self.distance <= 10_000, f"distance must be in [0, 10000], got {self.distance}"),
            (self.is_samples >= 1, f"is_samples must be >= 1, got {self.is_samples}"),
            (self.is_max_rows >= 1, f"is_max_rows must be >= 1, got {self.is_max_rows}"),
        ])
        if self.model == "vae":  # Glow's latent size is known only with the data (check_data)
            self.check_components(self.latent_dim)

    @property
    def mean_layout(self) -> str:
        """The K > 2 mean layout: ``layout``, or the paper's for the model (§5.4)."""
        return self.layout if self.layout != "auto" else ("line" if self.model == "glow" else "axes")

    def check_components(self, dim: int) -> None:
        try:
            check_components(self.components, dim, self.mean_layout)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def model_config(self, shape: tuple[int, int, int]) -> glow.GlowConfig | CatVAEConfig:
        """The model for ID images of this (C, H, W), its latent checked against the components."""
        c, h, w = shape
        try:
            if self.model == "glow":
                mcfg: glow.GlowConfig | CatVAEConfig = glow.GlowConfig(
                    channels=c, size=h, steps=self.glow_steps, hidden=self.glow_hidden, squeezes=self.glow_squeezes)
                dim = c * h * w
            else:
                mcfg = CatVAEConfig(arch=auto_arch(self.arch, c), channels=c, size=h, latent_dim=self.latent_dim)
                dim = self.latent_dim
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.check_components(dim)
        return mcfg

    def check_data(self, sets: SetInfos) -> None:
        super().check_data(sets)
        train = sets[(self.id, "train")]
        self.model_config(train.shape)
        if self.components > 1 and self.assignment == "labels":
            classes = labels_of(self.id, train, "assignment=labels (use assignment=kmeans)")
            check_one_component_per_class(classes, self.components)

    def score_names(self) -> tuple[str, ...]:
        return ("nll",)

    def metric_names(self) -> list[str]:
        keys = [set_key(o) for o in self.ood]
        return super().metric_names() + ["nll_mean_id"] + [f"nll_{w}_{k}" for k in keys for w in ("mean", "gap")]


class Experiment(BaseExperiment[Config]):
    """Data, component assignment, VAE or Glow, optimizer and progress of one mixture-prior trial."""

    def __init__(self, cfg: Config):
        train = self.start(cfg)
        self.train_x = train.x  # (N, C, H, W) uint8 on device
        mcfg = cfg.model_config(train.shape)
        self.model: glow.Glow | CatVAE = (glow.Glow(mcfg) if isinstance(mcfg, glow.GlowConfig) else CatVAE(mcfg)).to(
            self.device)
        dim = self.model.dims if isinstance(self.model, glow.Glow) else cfg.latent_dim
        self.prior = MixturePrior.build(cfg.family, cfg.components, cfg.distance, dim, cfg.beta, self.device,
                                        cfg.mean_layout)
        self.comp = self._assign(train)  # (N,) component of each training image
        if isinstance(self.model, glow.Glow):
            # Data-dependent actnorm init on up to 512 training images (fixed dequantization draw).
            init_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 2)
            self.model.initialize(glow.dequantize(self.train_x[:512], init_gen))
            self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)  # OpenAI Glow code: default betas
        else:
            self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
        self.gen = torch.Generator().manual_seed(cfg.seed)  # batch order
        self._last: dict[str, Any] | None = None  # latest evaluation, for write_artifacts

    def _assign(self, train: data.ImageSet) -> torch.Tensor:
        k = self.cfg.components
        if k == 1:
            return torch.zeros(len(train), dtype=torch.long, device=self.device)
        if self.cfg.assignment == "labels":
            if train.y is None:
                raise ConfigError(f"assignment=labels but {self.cfg.id!r} has no labels; use assignment=kmeans")
            return assign_by_labels(train.y, k)
        return assign_by_kmeans(train.x, k, self.cfg.seed)

    def train_epoch(self) -> dict[str, float]:
        model = self.model
        model.train()

        def step(idx: torch.Tensor) -> dict[str, torch.Tensor]:
            if isinstance(model, glow.Glow):
                return glow_loss(model, self.prior, self.train_x[idx], self.comp[idx])
            return loss(model, self.prior, data.to_float(self.train_x[idx]), self.comp[idx])

        return self.shuffled_epoch(step, self.opt)

    @torch.no_grad()
    def score(self) -> Scores:
        self.model.eval()
        gen = self.score_generator()
        out, comps, axis0 = {}, {}, {}
        for name, s in self.eval_sets.items():
            nll, mus = [], []
            for i in range(0, len(s), self.cfg.eval_batch_size):
                if isinstance(self.model, glow.Glow):  # exact likelihood; "posterior mean" = z itself
                    ll, z = glow_log_likelihood(self.model, self.prior, s.x[i : i + self.cfg.eval_batch_size], gen)
                    nll.append(-ll)
                    mus.append(z)
                    continue
                x = data.to_float(s.x[i : i + self.cfg.eval_batch_size])
                nll.append(
                    -is_log_likelihood(self.model, self.prior, x, self.cfg.is_samples, gen, self.cfg.is_max_rows)
                )
                mus.append(self.model.encode(x)[0])
            mu = torch.cat(mus)
            out[name] = {"nll": torch.cat(nll).cpu().numpy()}
            comps[name] = self.prior.nearest(mu).cpu().numpy()
            axis0[name] = mu[:, 0].cpu().numpy()
        self._last = {"scores": out, "comps": comps, "axis0": axis0}
        return out

    def evaluate(self) -> tuple[dict[str, float], Scores]:
        table, scores = super().evaluate()
        return {**table, **nll_summary(scores, self.cfg.ood)}, scores

    def write_artifacts(self, folder: Path) -> None:
        """``nll_by_component.png`` (ID vs OOD NLL per nearest component) and ``latent_axis0.png``."""
        if self._last is None:
            self.score()
        assert self._last is not None  # set by score
        nll_by_component_figure(self._last["scores"], self._last["comps"], self.prior.components,
                                folder / "nll_by_component.png")
        latent_axis_figure(self._last["axis0"], folder / "latent_axis0.png")

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "epoch": self.epoch,
                "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(), "comp": self.comp.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.epoch = int(state["epoch"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        self.comp = state["comp"].to(self.device)
