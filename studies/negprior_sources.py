"""Sources of negatives of paper 000 (Csiszárik et al.), Tables I and III setting.

A VAE is trained on the ID set with negatives from each source (none = baseline VAE,
an auxiliary set, Gaussian / uniform noise sets, random images, noisy inliers, or the
VAE's own samples trained adversarially), for each noise model (Bernoulli, Gaussian),
optionally with the EUBO loss on negatives, over seeds. Each trial scores BPD and KL
on the ID test set and every OOD set; Optuna's target is the validation AUROC (BPD).
`oodlab report negprior_sources` prints the mean (sd) table beside the paper's numbers.

    python studies/negprior_sources.py --smoke                     # ~2 minutes on 2 CPU cores
    python studies/negprior_sources.py --seeds 10 --gpus-per-trial 0.25   # the paper's Table I rows
    python studies/negprior_sources.py --negatives none,aux,random,inlier_noise,adversarial  # Table III
    python studies/negprior_sources.py --eubo both --negatives aux # EUBO vs negative prior
    python studies/negprior_sources.py --resume                    # after a crash or Ctrl-C
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from oodlab import data
from oodlab.experiment import ConfigError
from oodlab.methods.negprior import NEGATIVES, Config
from oodlab.runner import main
from oodlab.space import Categorical, FloatRange
from oodlab.study import StudySpec, ValTarget, add_config_flags, common_overrides, config_flags, default_name

DEFAULT_NEGATIVES = "none,aux,adversarial,gaussian_noise,uniform_noise"
SMOKE_NEGATIVES = ["none", "aux", "adversarial"]
# Paper 000 Tables I and III: the grid is the sources × noise models (× EUBO); a continuous search
# adds the negatives' weight (log, around the paper's 1) and the learning rate (log, around 1e-4).
GRID = {"negatives": Categorical(tuple(DEFAULT_NEGATIVES.split(","))),
        "decoder": Categorical(("bernoulli", "gaussian"))}
SPACE = {**GRID, "neg_weight": FloatRange(0.1, 10, log=True), "lr": FloatRange(1e-5, 1e-3, log=True)}


# Config fields with a flag of their own; their defaults live in negprior.Config.
FLAGS = {"neg_weight": "weight of the negatives' term", "adv_weight": "weight of L_adv in the adversarial decoder step",
         "noise_sigma": "σ of inlier_noise negatives (paper: 0.25)",
         "spectral_norm": "spectral norm on the encoder's convolutions (paper: color + adversarial)",
         "pad": "zero-pad 28×28 to 32×32 as the paper does", "batch_size": "batch size", "lr": "learning rate",
         "eval_every": "evaluate every k epochs"}


def configure(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("negative sources")
    g.add_argument("--id", default="fashion_mnist", help="in-distribution set (default fashion_mnist)")
    g.add_argument("--ood", default="mnist", help="OOD set(s), comma-separated; npz:PATH works (default mnist)")
    g.add_argument("--aux", default="notmnist", help="auxiliary negatives (paper: emnist_letters; default notmnist)")
    g.add_argument("--aux-split", default="test", choices=("train", "test"),
                   help="split of --aux (offline notMNIST: test)")
    g.add_argument("--negatives", help=f"comma-separated sources out of {', '.join(NEGATIVES)} "
                                       f"(default {DEFAULT_NEGATIVES}; --smoke: {','.join(SMOKE_NEGATIVES)})")
    g.add_argument("--decoders", help="comma-separated noise models (default bernoulli,gaussian; --smoke: bernoulli)")
    g.add_argument("--eubo", default="off", choices=("off", "on", "both"),
                   help="EUBO loss on negatives (both = a grid dim)")
    g.add_argument("--shift", type=float, help="negative prior mean shift·1 (default: paper's 8 gray, 25 color)")
    add_config_flags(g, Config, FLAGS)
    g.add_argument("--optimizer", help="rmsprop | adam (default: paper's rmsprop gray, adam color)")


def _list(text: str | None, default: list[str]) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else default


def build(args: argparse.Namespace) -> StudySpec:
    negatives = _list(args.negatives, SMOKE_NEGATIVES if args.smoke else DEFAULT_NEGATIVES.split(","))
    decoders = _list(args.decoders, ["bernoulli"] if args.smoke else ["bernoulli", "gaussian"])
    bad = [n for n in negatives if n not in NEGATIVES]
    if bad:
        raise ConfigError(f"--negatives: unknown source(s) {bad}; known: {', '.join(NEGATIVES)}")
    color = data.load(args.id, "test").shape[0] == 3 if args.shift is None or args.optimizer is None else False
    fixed = dict(id=args.id, ood=args.ood, aux=args.aux, aux_split=args.aux_split, method="negprior",
                 shift=args.shift if args.shift is not None else (25.0 if color else 8.0),
                 optimizer=args.optimizer or ("adam" if color else "rmsprop"),
                 **config_flags(args, Config, FLAGS), **common_overrides(args))
    grid: dict = {"negatives": negatives, "decoder": decoders}
    if args.eubo == "both":
        grid["eubo"] = [False, True]
    else:
        fixed["eubo"] = args.eubo == "on"
    return StudySpec(
        name=default_name(__file__, args),
        fixed=fixed,
        space={**SPACE, **{k: Categorical(tuple(v)) for k, v in grid.items()}},
        grid=grid,
        metric=ValTarget("auroc", "bpd"),
        paper_point={"neg_weight": 1.0, "lr": 1e-4},
    )


if __name__ == "__main__":
    sys.exit(main(__file__, build, configure, space=SPACE, grid=GRID))
