"""ROSE vs the outlier-exposure baselines of paper 004 (Choi et al.): one VAE, many scorings.

The paper's VAE is trained ONCE, in the driver, and cached under ``<storage>/vae_cache``
(keyed by its training config); every trial loads it and only scores. Families:

* ``rose``   — preconditioner ∈ {diag, ekfac} × Fisher sample count (paper Fig. 5, Table 6)
* ``lratio`` — Likelihood Ratio, background perturbation random:μ, μ (``lratio_mu``) ∈ {0.1, 0.2, 0.3, 0.4},
               × L2 strength λ ∈ {0, 10} (each trial trains its background VAE, also cached)
* ``rnd``    — RND perturbation ∈ {svd:22, svd:28, dct:22, dct:28, gb, random:0.2, random:0.3}

Every trial scores the OOD sets of Table 2 that exist here, the "overall" mixed set (the
paper's proportions: noise and constant one tenth each) and ``--bright`` (MNIST) at brightness
0.2×…1.8× (paper §3.2, Table 1); Optuna's target is the validation AUROC of the family's score,
and the brightness AUROC mean / std are logged. Paper 004's FPR80 is ``fpr80_oodpos`` (share of
ID images flagged at the threshold catching 80% of OOD). Defaults are the authors' setup: VAE
100 epochs with horizontal flips and DCGAN initialisation, Fisher on 10,000 images.

    python studies/rose_perturbation.py --smoke                  # 2 trials; a few minutes on 2 CPU cores
    python studies/rose_perturbation.py --family lratio --epochs 30 --gpus-per-trial 0.25
    python studies/rose_perturbation.py --family rnd --resume
    python studies/rose_perturbation.py --scores rose_diag,rose_ekfac,nll --fisher-n 10000 --seeds 3   # Tables 2, 5
"""

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from oodlab.experiment import load_sets, resolve_device
from oodlab.runner import main
from oodlab.space import Categorical, FloatRange, IntRange
from oodlab.study import StudySpec, ValTarget, common_overrides, default_name

OOD = "mnist,notmnist,omniglot,gaussian_noise,uniform_noise,constant,overall"
BRIGHTNESS = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8]
# score, paper grid (Fig. 5 / Table 6; Table 2's LRatio μ and λ; RND perturbations)
FAMILIES: dict[str, tuple[str, dict[str, list[Any]]]] = {
    "rose": ("rose", {"preconditioner": ["diag", "ekfac"], "fisher_n": [100, 1000, 10000]}),
    "lratio": ("lratio", {"lratio_mu": [0.1, 0.2, 0.3, 0.4], "lratio_l2": [0.0, 10.0]}),
    "rnd": ("rnd", {"rnd_perturbation": ["svd:22", "svd:28", "dct:22", "dct:28", "gb", "random:0.2", "random:0.3"]}),
}
# Continuous spaces: Fisher sample count on a log scale over the paper's 100..10000; LRatio's
# background μ over the paper's 0.1..0.4 and λ over [0, 10]; RND K over 16..28.
SPACES: dict[str, dict[str, Any]] = {
    "rose": {"preconditioner": Categorical(("diag", "ekfac")), "fisher_n": IntRange(100, 10000, log=True)},
    "lratio": {"lratio_mu": FloatRange(0.1, 0.4), "lratio_l2": FloatRange(0.0, 10.0)},
    "rnd": {"rnd_perturbation": Categorical(
        (*(f"{kind}:{k}" for kind in ("svd", "dct") for k in (16, 20, 22, 24, 28)), "gb", "random:0.2", "random:0.3"))},
}

def configure(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ROSE perturbation study")
    g.add_argument("--family", default="rose", choices=sorted(FAMILIES), help="which search space (default rose)")
    g.add_argument("--id", default="fashion_mnist", help="in-distribution set")
    g.add_argument("--ood", default=OOD, help=f"OOD sets (default {OOD})")
    g.add_argument("--bright", default="mnist", help="set scored at brightness 0.2×…1.8× ('' = none)")
    g.add_argument("--fisher-n", type=int, help="fix the Fisher sample count instead of searching it")
    g.add_argument("--iwae-k", type=int, default=20, help="IWAE samples for likelihoods (paper 20)")
    g.add_argument("--width", type=int, default=32, help="VAE width n (paper 32 FMNIST, 64 CIFAR-10)")
    g.add_argument("--latent-dim", type=int, default=100, help="latent size (paper 100 FMNIST, 200 CIFAR-10)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--scores", help="score every trial with these (comma list, no family search): rose_diag,rose_ekfac")
    g.add_argument("--arch", choices=("dcgan_bn", "plain"), default="dcgan_bn",
                   help="dcgan_bn: Likelihood Regret's VAE (BatchNorm, separate heads; the authors'); "
                        "plain: no BatchNorm, one fused head")
    g.add_argument("--init", choices=("dcgan", "torch"), default="dcgan",
                   help="VAE initialisation: dcgan N(0, 0.02) (the authors') or PyTorch's defaults")
    g.add_argument("--no-hflip", action="store_true", help="train the VAE without random horizontal flips")
    g.add_argument("--synth-native", action="store_true",
                   help="draw noise/constant sets at 28×28 and resize them (default: drawn at 32×32, the authors')")
    g.add_argument("--pad", action="store_true", help="zero-pad 28×28 to 32×32 instead of resizing")
    g.add_argument("--rose-z", choices=("mean", "sample"), default="mean", help="latent in the ROSE gradient")
    g.add_argument("--damping", type=float, default=1e-8, help="Fisher damping (authors: 1e-8, absolute)")
    g.add_argument("--damping-relative", action="store_true", help="damping × mean of F (e.g. with --damping 1e-3)")


def build(args: argparse.Namespace) -> StudySpec:
    score, grid = FAMILIES[args.family]
    grid, space = dict(grid), dict(SPACES[args.family])
    if args.scores:  # fixed scores: the trials differ only by seed
        score, grid, space = args.scores, {}, {}
    names = score.split(",")
    target = "rose_ekfac" if "rose_ekfac" in names else names[0]
    factors = [0.2, 1.8] if args.smoke else BRIGHTNESS
    bright = [f"{args.bright}[brightness={f}]" for f in factors] if args.bright else []
    ood = "mnist,overall" if args.smoke and args.ood == OOD else args.ood
    if args.fisher_n or args.smoke:
        grid.pop("fisher_n", None)
        space.pop("fisher_n", None)
    if args.smoke:  # two trials
        grid = ({k: v[:2] for k, v in grid.items()} if args.family != "lratio"
                else {"lratio_mu": [0.3], "lratio_l2": [0.0, 10.0]})
    fixed = dict(method="rose", id=args.id, ood=",".join([ood, *bright]), scores=score, iwae_k=args.iwae_k,
                 width=args.width, latent_dim=args.latent_dim, batch_size=args.batch_size, lr=args.lr,
                 vae_cache=str(Path(args.storage).resolve() / "vae_cache"), arch=args.arch, pad=args.pad,
                 resize=not args.pad, rose_z=args.rose_z, damping=args.damping, damping_relative=args.damping_relative,
                 init=args.init, hflip=not args.no_hflip, synth_at_input=not args.synth_native,
                 **common_overrides(args))
    if args.fisher_n or args.smoke:
        fixed["fisher_n"] = args.fisher_n or 200
    def pretrain_all(final: dict) -> None:
        """Every replicate's VAE (seeds seed … seed+seeds−1 of the trials' config), one after another."""
        first = int(final.get("seed", 0))
        for seed in range(first, first + int(final.get("seeds", 1))):
            pretrain({**final, "seed": seed, "seeds": 1})

    return StudySpec(
        name=default_name(__file__, args),
        fixed=fixed,
        space=space,
        grid=grid,
        metric=ValTarget("auroc", target),
        before_run=pretrain_all,
    )


def pretrain(fixed: dict) -> None:
    """Train the shared VAE once in the driver (a no-op when it is cached), so trials only score."""
    from oodlab.methods.rose import Config, ensure_vae

    cfg = Config.from_dict(fixed)
    device = resolve_device(cfg.device)
    train, _ = load_sets(cfg, device)
    logging.getLogger("oodlab").info("shared VAE: %s (%d images, %d epochs)", cfg.vae_cache, len(train), cfg.epochs)
    ensure_vae(cfg, train.x, device)


if __name__ == "__main__":
    sys.exit(main(__file__, build, configure, space=SPACES["rose"], grid=FAMILIES["rose"][1]))
