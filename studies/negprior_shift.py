"""Negative-prior shift sweep of paper 000 (Csiszárik et al.), Table I setting.

A VAE is trained on the ID set while the posteriors of auxiliary negatives are pushed to
N(shift·1, I); the sweep covers shift ∈ {2,4,6,8,10} for gray data and {5,…,30} for
color data (paper's choices: 8 and 25), over seeds. Each trial scores BPD and KL on the
ID test set and every OOD set, and on the validation sets; Optuna's target is the validation
AUROC of BPD (held-out ID training images vs the first validation OOD set).

    python studies/negprior_shift.py --smoke                 # minutes on a laptop CPU
    python studies/negprior_shift.py --seeds 3 --gpus-per-trial 0.5
    python studies/negprior_shift.py --resume                # after a crash or Ctrl-C
    python studies/negprior_shift.py --negatives none --shifts 8   # the baseline VAE
    python studies/negprior_shift.py --sampler tpe --scheduler asha --space shift=2..10   # TPE + early stopping
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from oodlab import data
from oodlab.methods.negprior import Config
from oodlab.runner import main
from oodlab.space import Categorical, Dimension, FloatRange
from oodlab.study import StudySpec, ValTarget, add_config_flags, common_overrides, config_flags, default_name

# Paper 000 §IV: shift ∈ {2,4,6,8,10} tried for gray data, {5,10,…,30} for color (chosen: 8 and 25);
# negative weight and learning rate are searched on log scales around the paper's 1 and 1e-4.
GRAY_SHIFTS = [2.0, 4.0, 6.0, 8.0, 10.0]
COLOR_SHIFTS = [5.0, 10.0, 15.0, 20.0, 25.0, 30.0]
SPACE: dict[str, Dimension] = {"shift": FloatRange(2, 10), "neg_weight": FloatRange(0.1, 10, log=True),
         "lr": FloatRange(1e-5, 1e-3, log=True)}
COLOR_SPACE = {**SPACE, "shift": FloatRange(5, 30)}
GRID: dict[str, Dimension] = {"shift": Categorical(tuple(GRAY_SHIFTS))}
COLOR_GRID: dict[str, Dimension] = {"shift": Categorical(tuple(COLOR_SHIFTS))}

# Config fields with a flag of their own; their defaults live in negprior.Config.
FLAGS = {"arch": "VAE architecture: auto | gray | color (auto: color for 3-channel data)",
         "neg_weight": "weight of the negatives' KL term", "pad": "zero-pad 28×28 to 32×32 as the paper does",
         "batch_size": "batch size", "lr": "learning rate", "optimizer": "rmsprop | adam",
         "iwae_k": "also score the IWAE bound with k samples (0 = off)", "eval_every": "evaluate every k epochs"}


def configure(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("negative-prior sweep")
    g.add_argument("--id", default="fashion_mnist", help="in-distribution set (default fashion_mnist)")
    g.add_argument("--ood", default="mnist", help="OOD set(s), comma-separated; npz:PATH works (default mnist)")
    g.add_argument("--aux", default="omniglot", help="auxiliary negatives (paper: emnist_letters; default omniglot, "
                   "handwritten like it: see docs/results.md for omniglot vs notmnist)")
    g.add_argument("--aux-split", default="train", choices=("train", "test"),
                   help="split of --aux (default train; offline notMNIST has only test)")
    g.add_argument("--negatives", default="aux", help="negative source: aux | none (baseline); a comma list "
                   "(e.g. none,aux) makes it a grid dimension")
    g.add_argument("--decoder", default="bernoulli", help="noise model: bernoulli | gaussian; a comma list "
                   "makes it a grid dimension")
    g.add_argument("--shifts", help="comma-separated shifts, searched by every sampler (= --space shift=LIST; "
                   "default: the paper grid / range for gray or color data)")
    add_config_flags(g, Config, FLAGS)


def build(args: argparse.Namespace) -> StudySpec:
    color = data.load(args.id, "test").shape[0] == 3
    space, grid = (dict(COLOR_SPACE), dict(COLOR_GRID)) if color else (dict(SPACE), dict(GRID))
    if args.shifts:
        space["shift"] = grid["shift"] = Categorical(tuple(float(s) for s in args.shifts.split(",")))
    elif args.smoke:
        paper = COLOR_SHIFTS if color else GRAY_SHIFTS
        grid["shift"] = Categorical((paper[0], paper[3]))
    listed = {"negatives": args.negatives.split(","), "decoder": args.decoder.split(",")}
    for k, v in listed.items():
        if len(v) > 1:
            space[k] = grid[k] = Categorical(tuple(v))
    fixed = dict(id=args.id, ood=args.ood, aux=args.aux, aux_split=args.aux_split,
                 **{k: v[0] for k, v in listed.items() if len(v) == 1}, **config_flags(args, Config, FLAGS),
                 **common_overrides(args))
    return StudySpec(
        name=default_name(__file__, args),
        fixed=fixed,
        space=space,
        grid=grid,
        metric=ValTarget("auroc", "bpd"),
        paper_point={"shift": 25.0 if color else 8.0, "neg_weight": 1.0, "lr": 1e-4},
    )


if __name__ == "__main__":
    sys.exit(main(__file__, build, configure, space=SPACE, grid=GRID))
