"""Seconds per training epoch of paper 000's VAE on this machine's device.

    python benchmarks/epoch_time.py                 # full Fashion-MNIST train set, batch 50
    python benchmarks/epoch_time.py --train-n 3000  # a subset, scaled up to 60k in the output

Prints one line per (decoder, negatives): ``epoch_s_<decoder>_<negatives>=X`` (seconds for
60,000 images, measured on the second epoch so start-up and kernel selection are excluded).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oodlab.registry import build


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-n", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=50)
    a = p.parse_args()
    for decoder in ("bernoulli", "gaussian"):
        for negatives in ("none", "aux"):
            exp = build(dict(decoder=decoder, negatives=negatives, train_n=a.train_n, test_n=100, pad=True,
                             batch_size=a.batch_size, device=a.device, epochs=2))
            exp.train_epoch()  # warm-up
            if exp.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            exp.train_epoch()
            if exp.device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) * 60000 / len(exp.train_x)
            print(f"epoch_s_{decoder}_{negatives}={dt:.2f} device={exp.device} n={len(exp.train_x)}", flush=True)


if __name__ == "__main__":
    main()
