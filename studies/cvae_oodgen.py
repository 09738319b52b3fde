"""CVAE OOD generation of paper 002 (Vernekar et al.): Type I/II samples + (n+1)-class classifier.

Each trial trains a CVAE on the ID classes, generates Type I (decoder-Jacobian null space,
β ~ U[beta_low, beta_high]) and Type II (outside the per-class 95% latent ellipsoid,
radius up to radius_factor·r95) OOD samples, trains the (n+1)-class classifier on them and
scores every test set with p(n+1 | x). With baselines on (default) the same trial also
trains a plain n-class classifier (max-softmax, ODIN, Mahalanobis, MC-dropout, mutual
information) and a confident classifier (joint GAN, Lee et al. 2018a). Optuna searches
the β range ends, the Type II radius factor, the OOD class weight, the Type I/II mix and
seeds; the target is FPR95 (min) of n1_prob on the first validation OOD set. FPR95 is the
paper's ID-positive one (share of OOD accepted at the threshold keeping 95% of ID), and
``acc_n1`` the paper's accuracy: (n+1)-way, predicting the OOD class is an error. Defaults
are the notebook's: its classifier layers (``--clf-arch notebook``), Keras' Adadelta ρ 0.95, ε 1e-7.

    python studies/cvae_oodgen.py --smoke                   # ~2 minutes on 2 CPU cores
    python studies/cvae_oodgen.py --sampler tpe --num-samples 20 --seeds 3 --gpus-per-trial 0.25
    python studies/cvae_oodgen.py --resume                  # after a crash or Ctrl-C
    python studies/cvae_oodgen.py --paper-point --epochs 10 --cvae-epochs 10 --train-n 10000 --test-n 2000
    python studies/cvae_oodgen.py --paper-point --generator text ...   # the paper text's generator and CVAE layers
"""

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from oodlab.methods.oodgen import FMNIST_OOD
from oodlab.runner import main
from oodlab.space import Categorical, FloatRange
from oodlab.study import StudySpec, ValTarget, common_overrides, default_name

# Generator presets: the authors' notebook (sverneka/OODGen) and the paper's text. Each sets the
# fixed config; POINTS holds each one's (beta_low, beta_high, radius_factor) for --paper-point.
GENERATORS = {
    "authors": dict(cvae_arch="authors", cvae_optimizer="rmsprop", cvae_sample=False,
                    type1_direction="basis_mix", beta_sign="random", clip=True),
    "text": dict(cvae_arch="text", cvae_optimizer="adam", cvae_sample=True,
                 type1_direction="uniform", beta_sign="positive", clip=False),
}
POINTS = {"authors": (0.1, 28.0, 1.5), "text": (0.1, 1.0, 1.0)}
# Paper 002's ranges: Type I β ~ U[β_low, β_high] (text [0.1, 1]; authors' code up to 28, clipped),
# so β_low over [0.01, 0.5] and β_high over [0.5, 28] (log); Type II radius factor over [1, 3]
# (1 = the 95% ellipsoid surface, authors 1.5); OOD class weight on a log scale around 0.1.
SPACE = {"beta_low": FloatRange(0.01, 0.5, log=True), "beta_high": FloatRange(0.5, 28.0, log=True),
         "radius_factor": FloatRange(1.0, 3.0), "ood_weight": FloatRange(0.01, 1.0, log=True),
         "type1_frac": FloatRange(0.0, 1.0)}
GRID = {"beta_low": Categorical((0.1, 0.3)), "beta_high": Categorical((1.0, 28.0)),
        "radius_factor": Categorical((1.0, 1.5, 2.0)), "ood_weight": Categorical((0.1, 0.5)),
        "type1_frac": Categorical((0.5,))}


def configure(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CVAE OOD generation")
    g.add_argument("--id", default="fashion_mnist[labels=0-4]", help="ID classes (default fashion_mnist[labels=0-4])")
    g.add_argument("--ood", default=",".join(FMNIST_OOD), help="OOD set(s), comma-separated")
    g.add_argument("--generator", choices=tuple(GENERATORS), default="authors",
                   help="authors: the released notebook's CVAE and Type I/II draws (default); text: the paper text's")
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
    g.add_argument("--clf-arch", choices=("notebook", "pooled"), default="notebook",
                   help="classifier layers: notebook (conv-conv-pool, 9,216-wide dense; the authors') or pooled")
    g.add_argument("--mc-samples", type=int, help="MC-dropout passes (default 20; 5 with --smoke)")
    g.add_argument("--odin-eps", type=float, default=0.0014, help="ODIN input perturbation")
    g.add_argument("--maha-eps", type=float, default=0.0, help="Mahalanobis input preprocessing (0 = off)")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every k epochs")


def build(args: argparse.Namespace) -> StudySpec:
    low, high, factor = POINTS[args.generator]
    point: dict[str, Any] = {"beta_low": low, "beta_high": high, "radius_factor": factor, "ood_weight": 0.1,
                             "type1_frac": 0.5}
    grid: dict[str, Any] = dict(GRID)
    if args.paper_point:
        grid = {k: [v] for k, v in point.items()}
    elif args.smoke:  # two trials: radius factors 1 and 2 at the generator's β range
        grid = {**{k: [v] for k, v in point.items()}, "radius_factor": [1.0, 2.0]}
    cvae_epochs = args.cvae_epochs or (1 if args.smoke else 10)
    mc_samples = args.mc_samples or (5 if args.smoke else 20)
    fixed = dict(method="oodgen", id=args.id, ood=args.ood, latent_dim=args.latent_dim, cvae_epochs=cvae_epochs,
                 optimizer=args.optimizer, lr=args.lr, batch_size=args.batch_size, mc_samples=mc_samples,
                 odin_eps=args.odin_eps, maha_eps=args.maha_eps, baselines=not args.no_baselines,
                 eval_every=args.eval_every, clf_arch=args.clf_arch, **GENERATORS[args.generator],
                 **common_overrides(args))
    return StudySpec(
        name=default_name(__file__, args),
        fixed=fixed,
        space=dict(SPACE),
        grid=grid,
        metric=ValTarget("fpr95", "n1_prob"),  # --target val_auroc_<set>_n1_prob for AUROC
        mode="min",
        paper_point=point,
    )


if __name__ == "__main__":
    sys.exit(main(__file__, build, configure, space=SPACE, grid=GRID))
