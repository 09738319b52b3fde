"""Component-distance sweep of papers 001/003 (Kamoi & Kobayashi), §5.3 and Fig. 6.

A VAE with a 256-way categorical decoder is trained on Fashion-MNIST labels {1, 7} with
an untrainable mixture prior (Gaussian or generalized-Gaussian β=4 components at ±d/2·e_1,
or d·e_i for K > 2); each training image is pulled to the component of its label (or of
its k-means cluster). Each trial reports the importance-sampled NLL of the ID test set and
of MNIST, AUROC(NLL) and the MNIST-minus-ID mean NLL gap. ``--components 1`` is the
standard-prior baseline (paper Table 1: MNIST NLL 1647.8 standard vs 2822.0 bimodal d=150).
``--models vae,glow`` adds the paper's single-scale Glow (exact NLL, no importance sampling;
paper Table 1: MNIST NLL 1372.2 standard vs 2679.9 bimodal d=100).

    python studies/mixture_distance.py --smoke                      # ~2 min on 2 CPU cores
    python studies/mixture_distance.py --families gaussian,gen_gaussian --seeds 3 --gpus-per-trial 0.25
    python studies/mixture_distance.py --components 1,2 --distances 150   # Table 1 (nll_gap_mnist in every run)
    python studies/mixture_distance.py --sampler tpe --num-samples 20 --distances 10,14,20,30,50,70,100,150,200,300
    python studies/mixture_distance.py --models glow --components 1,2 --distances 100
    python studies/mixture_distance.py --sampler tpe --num-samples 20 --seeds 2   # d, family, β, K over the ranges
    python studies/mixture_distance.py --resume                     # after a crash or Ctrl-C
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from oodlab.methods.mixture import Config
from oodlab.runner import main
from oodlab.space import Categorical, FloatRange, IntRange
from oodlab.study import StudySpec, ValTarget, add_config_flags, common_overrides, config_flags, default_name

# Log-spaced 10..300 plus the papers' values (VAE 150, Glow 100, CIFAR VAE 200).
DISTANCES = [10, 20, 50, 100, 150, 200, 300]
# Papers 001/003: d searched on a log scale over 10..300; generalized-Gaussian shape β (paper 4)
# over 1..8; K components 2..4 (k-means assignment: K > 2 needs it; labels {1,7} give K = 2).
SPACE = {"distance": FloatRange(10, 300, log=True), "family": Categorical(("gaussian", "gen_gaussian")),
         "beta": FloatRange(1, 8), "components": IntRange(2, 4), "assignment": Categorical(("kmeans",))}
GRID = {"distance": Categorical(tuple(float(d) for d in DISTANCES)), "family": Categorical(("gaussian",)),
        "components": Categorical((2,)), "assignment": Categorical(("labels",)), "model": Categorical(("vae",))}
SMOKE = {"train_n": 500, "test_n": 100, "is_samples": 2}  # on top of the shared --smoke (epochs=1)


def _list(text: str, cast=str) -> list:
    return [cast(v) for v in text.split(",") if v.strip()]


# Config fields with a flag of their own; their defaults live in mixture.Config.
FLAGS = {"beta": "generalized-Gaussian shape (paper: 4)", "glow_steps": "Glow flow steps (paper 32)",
         "glow_hidden": "Glow coupling width (OpenAI code 512)",
         "latent_dim": "latent size (paper: 50 gray, 100 color)",
         "is_samples": "importance samples per test image (paper 5000)", "batch_size": "batch size",
         "lr": "Adam(0.5, 0.9) learning rate (paper 1e-3)"}


def configure(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixture-prior sweep")
    g.add_argument("--id", default="fashion_mnist[labels=1,7]", help="in-distribution set (default Fashion-MNIST 1,7)")
    g.add_argument("--ood", default="mnist", help="OOD set(s), comma-separated; npz:PATH works (default mnist)")
    g.add_argument("--distances", help=f"comma-separated component distances d (default {DISTANCES})")
    g.add_argument("--families", default="gaussian", help="comma-separated: gaussian, gen_gaussian")
    g.add_argument("--components", default="2", help="comma-separated K values (1 = standard prior)")
    g.add_argument("--assignment", default="labels", help="comma-separated: labels, kmeans")
    g.add_argument("--models", "--model", dest="model", default="vae",
                   help="comma-separated generative models: vae, glow (paper Glow: d=100)")
    add_config_flags(g, Config, FLAGS)
    g.add_argument("--eval-every", type=int, default=10, help="evaluate every k epochs (IS is costly)")


def build(args: argparse.Namespace) -> StudySpec:
    distances = _list(args.distances, float) if args.distances else [float(d) for d in DISTANCES]
    if args.smoke and not args.distances:
        distances = [20.0, 150.0]
    fixed = dict(method="mixture", id=args.id, ood=args.ood, eval_every=args.eval_every,
                 **config_flags(args, Config, FLAGS), **common_overrides(args))
    if args.smoke:
        fixed.update({k: v for k, v in SMOKE.items() if getattr(args, k) is None})
    grid = {"distance": distances, "family": _list(args.families), "components": _list(args.components, int),
            "assignment": _list(args.assignment), "model": _list(args.model)}
    space = dict(SPACE)
    if args.distances:
        space["distance"] = Categorical(tuple(distances))
    return StudySpec(
        name=default_name(__file__, args),
        fixed=fixed,
        space=space,
        grid=grid,
        metric=ValTarget("auroc", "nll"),
        paper_point={"distance": 150.0, "beta": 4.0, "components": 2},
    )


if __name__ == "__main__":
    sys.exit(main(__file__, build, configure, space=SPACE, grid=GRID))
