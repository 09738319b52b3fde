"""Blobs (the validation OOD set every study scores): the separable Gaussian blur as two band-matrix
matmuls (``oodlab.data.blobs``) against the same blur as two reflect-padded ``conv2d`` calls (the
baseline below, what data.py did before), on the full 10,000-image test split a trial generates.

Prints ``name=value`` lines: the seconds of each (best of 5) and ``blobs_matmul_vs_conv_ratio``
(< 1: the matmul is faster), for gray 28×28 and colour 32×32, and how many pixels differ.

    python benchmarks/synthetic_sets.py [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from oodlab.data import blobs


def blobs_conv(shape: tuple[int, int, int, int], g: torch.Generator) -> torch.Tensor:
    """The baseline: the same Bernoulli draw, blurred by two reflect-padded 1-D convolutions."""
    n, c, h, w = shape
    x = torch.bernoulli(torch.full((n * c, 1, h, w), 0.7), generator=g)
    r = torch.arange(-4, 5, dtype=torch.float32)
    k = torch.exp(-r.pow(2) / (2 * 1.5**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (4, 4, 0, 0), mode="reflect"), k.view(1, 1, 1, 9))
    x = F.conv2d(F.pad(x, (0, 0, 4, 4), mode="reflect"), k.view(1, 1, 9, 1))
    return (x >= 0.75).to(torch.uint8).mul(255).view(n, c, h, w).contiguous()


def best_of(fn, shape: tuple[int, int, int, int], repeats: int = 5) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(shape, torch.Generator().manual_seed(0))
        times.append(time.perf_counter() - start)
    assert out is not None
    return min(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads}")
    for label, shape in (("gray28", (10_000, 1, 28, 28)), ("color32", (10_000, 3, 32, 32))):
        t_mat, a = best_of(blobs, shape)
        t_conv, b = best_of(blobs_conv, shape)
        print(f"{label}_matmul_s={t_mat:.3f}")
        print(f"{label}_conv_s={t_conv:.3f}")
        print(f"{label}_blobs_matmul_vs_conv_ratio={t_mat / t_conv:.3f}")
        print(f"{label}_pixels_differing={int((a != b).sum())} of {a.numel()}")


if __name__ == "__main__":
    main()
