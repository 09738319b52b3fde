"""CVAE OOD generation of paper 002 (Vernekar et al.): Type I/II samples + (n+1)-class classifier.

Each trial trains a CVAE on the ID classes, generates Type I (decoder-Jacobian null space,
β ~ U[beta_low, beta_high]) and Type II (outside the per-class 95% latent ellipsoid,
radius up to radius_factor·r95) OOD samples, trains the (n+1)-class classifier on them and
scores every test set with p(n+1 | x). With baselines on (default) the same trial also
trains a plain n-class classifier (max-softmax, ODIN, Mahalanobis, MC-dropout, mutual
information) and a confident classifier (joint GAN, Lee et al. 2018a). Optuna searches
the β range ends, the Type II radius factor, the OOD class weight, the Type I/II mix and
seeds; the target is FPR95 (min) or AUROC (max) of n1_prob on the first OOD set.

    python studies/cvae_oodgen.py --smoke                   # ~2 minutes on 2 CPU cores
    python studies/cvae_oodgen.py --target auroc --seeds 3 --gpus-per-trial 0.25
    python studies/cvae_oodgen.py --resume                  # after a crash or Ctrl-C
    python studies/cvae_oodgen.py --paper-point --epochs 10 --cvae-epochs 10 --train-n 10000 --test-n 2000
    python studies/cvae_oodgen.py --paper-point --generator text ...   # the paper text's generator and old layers
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from oodlab import data
from oodlab.experiment import metric_name
from oodlab.methods.oodgen import FMNIST_OOD
from oodlab.study import StudySpec, common_overrides, default_name, main

# Paper 002, Table 1, F-MNIST0-4 as ID (percent): Ours / Confident-Classifier / ODIN / MD.
PAPER = {
    "fpr95/fashion_mnist_labels_5_9": (19.7, 55.8, 29.2, 75.8), "fpr95/mnist": (1.8, 67.3, 53.5, 2.0),
    "fpr95/notmnist": (0.2, 76.0, 57.7, 11.0), "fpr95/omniglot": (1.0, 62.3, 15.5, 11.1),
    "fpr95/gaussian_noise": (0.0, 0.3, 0.0, 99.3), "fpr95/uniform_noise": (0.0, 9.8, 1.3, 36.3),
    "auroc/fashion_mnist_labels_5_9": (92.5, 89.5, 92.1, 79.5), "auroc/mnist": (99.5, 83.5, 86.4, 99.0),
    "auroc/notmnist": (99.9, 79.9, 84.1, 97.0), "auroc/omniglot": (99.5, 88.6, 96.5, 97.5),
    "auroc/gaussian_noise": (100.0, 99.7, 100.0, 53.4), "auroc/uniform_noise": (100.0, 98.1, 99.2, 95.0),
}
PAPER_FLAT = {
    f"{k}/{m}": v for k, vals in PAPER.items() for m, v in zip(("n1_prob", "confident", "odin", "mahalanobis"), vals)
}


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


# Generator presets: the authors' notebook (sverneka/OODGen) and the paper's text. Each sets the
# fixed config; POINTS holds each one's (beta_low, beta_high, radius_factor) for --paper-point.
GENERATORS = {
    "authors": dict(cvae_arch="authors", cvae_optimizer="rmsprop", cvae_sample=False,
                    type1_direction="basis_mix", beta_sign="random", clip=True),
    "text": dict(cvae_arch="text", cvae_optimizer="adam", cvae_sample=True,
                 type1_direction="uniform", beta_sign="positive", clip=False),
}
POINTS = {"authors": (0.1, 28.0, 1.5), "text": (0.1, 1.0, 1.0)}


def configure(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CVAE OOD generation")
    g.add_argument("--id", default="fashion_mnist[labels=0-4]", help="ID classes (default fashion_mnist[labels=0-4])")
    g.add_argument("--ood", default=",".join(FMNIST_OOD), help="OOD set(s), comma-separated")
    g.add_argument(
        "--target", choices=("fpr95", "auroc"), default="fpr95", help="Optuna target on n1_prob (fpr95: min)"
    )
    g.add_argument("--beta-lows", default="0.1,0.3", help="Type I β range lower ends")
    g.add_argument("--beta-highs", default="1.0,28.0", help="Type I β range upper ends (authors 28, text 1)")
    g.add_argument("--radius-factors", default="1.0,1.5,2.0", help="Type II radius factors (authors 1.5, text 1)")
    g.add_argument("--generator", choices=tuple(GENERATORS), default="authors",
                   help="authors: the released notebook's CVAE and Type I/II draws (default); text: the paper text's")
    g.add_argument("--ood-weights", default="0.1,0.5", help="OOD class weights")
    g.add_argument("--type1-fracs", default="0.5", help="fractions of Type I among generated samples")
    g.add_argument(
        "--paper-point",
        action="store_true",
        help="only the generator's point, weight 0.1: authors β∈[0.1,28], factor 1.5; text β∈[0.1,1], factor 1",
    )
    g.add_argument("--no-baselines", action="store_true", help="skip the plain/confident classifiers and their scores")
    g.add_argument("--latent-dim", type=int, default=10, help="CVAE latent size (paper: 10 F-MNIST, 8 MNIST)")
    g.add_argument("--cvae-epochs", type=int, help="CVAE passes before the classifiers (default 10; 1 with --smoke)")
    g.add_argument("--optimizer", default="adadelta", choices=("adadelta", "adam", "sgd"), help="classifier optimizer")
    g.add_argument("--lr", type=float, default=0.1, help="classifier lr (paper: Adadelta 0.1 for F-MNIST)")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--mc-samples", type=int, help="MC-dropout passes (default 20; 5 with --smoke)")
    g.add_argument("--odin-eps", type=float, default=0.0014, help="ODIN input perturbation")
    g.add_argument("--maha-eps", type=float, default=0.0, help="Mahalanobis input preprocessing (0 = off)")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every k epochs")


def build(args: argparse.Namespace) -> StudySpec:
    space = {"beta_low": _floats(args.beta_lows), "beta_high": _floats(args.beta_highs),
             "radius_factor": _floats(args.radius_factors), "ood_weight": _floats(args.ood_weights),
             "type1_frac": _floats(args.type1_fracs)}
    low, high, factor = POINTS[args.generator]
    if args.paper_point:
        space = {
            "beta_low": [low],
            "beta_high": [high],
            "radius_factor": [factor],
            "ood_weight": [0.1],
            "type1_frac": [0.5],
        }
    elif args.smoke:  # two trials: radius factors 1 and 2 at the generator's β range
        space = {
            "beta_low": [low],
            "beta_high": [high],
            "radius_factor": [1.0, 2.0],
            "ood_weight": [0.1],
            "type1_frac": [0.5],
        }
    space["seed"] = list(range(args.seeds))
    cvae_epochs = args.cvae_epochs or (1 if args.smoke else 10)
    mc_samples = args.mc_samples or (5 if args.smoke else 20)
    fixed = dict(method="oodgen", id=args.id, ood=args.ood, latent_dim=args.latent_dim, cvae_epochs=cvae_epochs,
                 optimizer=args.optimizer, lr=args.lr, batch_size=args.batch_size, mc_samples=mc_samples,
                 odin_eps=args.odin_eps, maha_eps=args.maha_eps, baselines=not args.no_baselines,
                 eval_every=args.eval_every, **GENERATORS[args.generator], **common_overrides(args))
    ood_first = data.split_specs(args.ood)[0]
    return StudySpec(
        name=default_name(__file__, args),
        fixed=fixed,
        space=space,
        metric=metric_name(args.target, ood_first, "n1_prob"),
        mode="min" if args.target == "fpr95" else "max",
        paper=PAPER_FLAT,
    )


if __name__ == "__main__":
    sys.exit(main(__file__, build, configure))
