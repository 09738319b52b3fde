"""Seconds per full-data training epoch of each paper's model on this machine's device.

    python benchmarks/epoch_time.py                             # every paper's model, 2,000-image subsets
    python benchmarks/epoch_time.py --models rose,oodgen --threads 1 --train-n 3000

A subset of ``--train-n`` images is timed on its second epoch (start-up and kernel selection
excluded) and scaled to the study's full training set (``FULL_N``: the ID training split less
its validation hold-out). One line per model part, ``epoch_s_<part>=X`` plus the full size:

* ``negprior_<decoder>_<negatives>`` paper 000's VAE (padded 32×32, batch 50)
* ``mixture_vae``, ``mixture_glow``  paper 001/003's VAE and Glow (Fashion-MNIST 1 and 7)
* ``oodgen_cvae``, ``oodgen_classifiers`` (``oodgen_n1_classifier``)  paper 002's CVAE epoch and one
  classifier epoch (Type I/II generation, the (n+1) classifier and, unless ``--no-baselines``, the
  plain and confident classifiers)
* ``rose_vae``  paper 004's VAE (32×32, flips, batch 64); also ``rose_fisher_s`` for the Fisher fit on
  ``--fisher-n`` images (diag + EKFAC) scaled to 10,000, and ``rose_score_img_per_s``
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oodlab.registry import build

FULL_N = {"negprior": 55000, "mixture": 11000, "oodgen": 27500, "rose": 55000}  # train split − val_n
MODELS = ("negprior", "mixture", "oodgen", "rose")


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call (CUDA synchronised)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def report(part: str, seconds: float, n: int, full: int, device: torch.device) -> None:
    print(f"epoch_s_{part}={seconds * full / n:.1f} full_n={full} measured_n={n} device={device} "
          f"threads={torch.get_num_threads()}", flush=True)


def negprior(a: argparse.Namespace) -> None:
    for decoder in ("bernoulli", "gaussian"):
        for negatives in ("none", "aux"):
            exp = build(dict(decoder=decoder, negatives=negatives, train_n=a.train_n, test_n=100, pad=True,
                             batch_size=50, device=a.device, epochs=2))
            exp.train_epoch()  # warm-up
            report(f"negprior_{decoder}_{negatives}", timed(exp.train_epoch, exp.device), len(exp.train_x),
                   FULL_N["negprior"], exp.device)


def mixture(a: argparse.Namespace) -> None:
    for model in ("vae", "glow"):
        exp = build(dict(method="mixture", model=model, train_n=a.train_n, test_n=100, device=a.device, epochs=2))
        exp.train_epoch()
        report(f"mixture_{model}", timed(exp.train_epoch, exp.device), len(exp.train_x), FULL_N["mixture"],
               exp.device)


def oodgen(a: argparse.Namespace) -> None:
    from oodlab.methods.oodgen import Experiment as OodgenExperiment

    exp = cast(OodgenExperiment, build(dict(method="oodgen", train_n=a.train_n, test_n=100, device=a.device,
                                            epochs=2, cvae_epochs=1, baselines=a.baselines)))
    exp.train_cvae(1)  # warm-up; also fits the latent Gaussians the classifiers' Type II draws need
    report("oodgen_cvae", timed(lambda: exp.train_cvae(1), exp.device), len(exp.train_x), FULL_N["oodgen"],
           exp.device)
    exp.epoch = 1  # past the CVAE: train_epoch now trains the classifiers only
    exp.train_epoch()
    part = "oodgen_classifiers" if a.baselines else "oodgen_n1_classifier"
    report(part, timed(exp.train_epoch, exp.device), len(exp.train_x), FULL_N["oodgen"], exp.device)


def rose(a: argparse.Namespace) -> None:
    from oodlab.methods import rose as r

    exp = cast(r.Experiment, build(dict(method="rose", train_n=a.train_n, test_n=a.fisher_n, device=a.device,
                                        epochs=1, fisher_n=a.fisher_n, scores="rose_diag,rose_ekfac", ood="mnist")))
    cfg = exp.cfg
    x = exp.train_x

    def epoch() -> None:
        r.train_vae(exp.model, x, 1, cfg.batch_size, cfg.lr, cfg.seed, hflip=cfg.hflip)

    epoch()
    report("rose_vae", timed(epoch, exp.device), len(x), FULL_N["rose"], exp.device)
    exp.model.eval()
    exp.trained, exp.history = True, [0.0]
    out: dict[str, dict[str, Any]] = {k: {} for k in exp.eval_sets}
    exp.score_rose(out)
    fit_s = exp.timings["rose_fit_s"] * 10000 / len(exp.fisher_images())
    print(f"rose_fisher_s={fit_s:.0f} (diag + EKFAC, scaled to 10,000 images) "
          f"rose_score_img_per_s={exp.timings['rose_img_per_s']:.0f} threads={torch.get_num_threads()}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {MODELS}")
    p.add_argument("--train-n", type=int, default=2000, help="images timed per epoch (scaled to the full set)")
    p.add_argument("--fisher-n", type=int, default=1000, help="ROSE: Fisher-fit images timed (scaled to 10,000)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="paper 002: time the (n+1) classifier alone, without the baselines' classifiers")
    a = p.parse_args()
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or a.train_n < 1 or a.fisher_n < 2:
        p.error(f"unknown models {bad} (known: {MODELS}) or --train-n < 1 or --fisher-n < 2")
    if a.threads:
        torch.set_num_threads(a.threads)
    for m in models:
        {"negprior": negprior, "mixture": mixture, "oodgen": oodgen, "rose": rose}[m](a)


if __name__ == "__main__":
    main()
