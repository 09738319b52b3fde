"""Throughput of paper 004's scores on the ROSE VAE (Fashion-MNIST size: 1×32×32, width 32, latent 100).

Prints images/second for ROSE (diag, EKFAC), Likelihood Regret, LRatio, IC (png, jp2) and
NLL, and the batched ÷ looped time ratios (goal ≤ 0.1), one `key=value` per line:

    python benchmarks/scores.py                  # CPU, small sizes
    python benchmarks/scores.py --n 512 --lr-steps 100 --device cuda

Paper 004 §5.2 (RTX 3090): ROSE ~110 img/s, LR ~2.5 img/s. Weights are untrained: speed
does not depend on them.
"""

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.flop_counter import FlopCounterMode

from oodlab import data
from oodlab.methods import likelihood_baselines as lb
from oodlab.methods import rose
from oodlab.models.rose_vae import RoseVAE, RoseVAEConfig


def timed(fn: Callable[[], Any], warmup: Callable[[], Any] | None = None) -> tuple[float, Any]:
    """Seconds of one call of ``fn``, after one call of ``warmup`` (default ``fn``) pays the one-time costs.

    Without it the first batch-1 convolutions (oneDNN picks and builds kernels per shape) made the
    looped references look up to 20× slower than they are.
    """
    (warmup or fn)()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def gflop(fn) -> float:
    """Matmul/conv GFLOP of one call of ``fn`` (forward and backward), by ``torch.utils.flop_counter``."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def matmul_peak_gflops(dev: torch.device) -> float:
    """GFLOP/s of a 2048² float32 matmul: what this machine's BLAS reaches at best."""
    a = torch.randn(2048, 2048, device=dev)
    best = min(timed(lambda: (a @ a).sum().item())[0] for _ in range(3))
    return 2 * 2048**3 / best / 1e9


def report_floor(name: str, f_batched: float, s_batched: float, f_loop: float, s_loop: float, peak: float) -> None:
    """Achieved GFLOP/s per path, and the ratio the batched path would reach even at the matmul peak."""
    print(f"{name}_gflops_per_s_batched={f_batched / s_batched:.1f}")
    print(f"{name}_gflops_per_s_loop={f_loop / s_loop:.1f}")
    print(
        f"{name}_ratio_at_matmul_peak={(f_batched / peak) / s_loop:.3f}"
        "  # the lowest batched ÷ looped this machine allows"
    )


def rose_loop(model, x, eps, fits) -> torch.Tensor:
    """Reference: per-sample gradients one image at a time (one backward per image)."""
    return torch.cat(
        [rose.rose_scores(model, x[j : j + 1], eps[j : j + 1], fits, batch=1)["diag"] for j in range(len(x))]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=128, help="images scored by the batched scores")
    p.add_argument("--n-loop", type=int, default=16, help="images for the looped references")
    p.add_argument("--lr-steps", type=int, default=10, help="Likelihood Regret steps (paper setting: 100)")
    p.add_argument("--iwae-k", type=int, default=20)
    p.add_argument("--rows", type=int, help="decoder rows per batched pass (default: the device's best)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    dev = torch.device(a.device)
    torch.manual_seed(0)
    model = RoseVAE(RoseVAEConfig()).to(dev).eval()
    rows = a.rows or model.rows_per_pass(dev)
    x = data.to_float(data.load("fashion_mnist", "test", pad_to=32).x[: a.n]).mul(255).round().to(torch.uint8).to(dev)
    eps = torch.randn(a.n, 100, device=dev)
    print(f"device={dev} threads={torch.get_num_threads()} n={a.n} n_loop={a.n_loop} lr_steps={a.lr_steps} "
          f"iwae_k={a.iwae_k} rows_per_pass={rows}")

    fits = rose.fit_rose(model, x, eps, ("diag", "ekfac"), batch=rows)
    per_image = {}
    for kind in ("diag", "ekfac"):
        t, _ = timed(partial(rose.rose_scores, model, x, eps, {kind: fits[kind]}, batch=rows))
        per_image[kind] = t / a.n
        print(f"rose_{kind}_img_per_s={a.n / t:.1f}")
    m = a.n_loop  # the loop's cost per image is constant, so a few images measure it
    sb = rose.rose_scores(model, x[:m], eps[:m], {"diag": fits["diag"]}, batch=rows)["diag"]
    t_l, sl = timed(lambda: rose_loop(model, x[:m], eps[:m], fits), lambda: rose_loop(model, x[:2], eps[:2], fits))
    assert torch.allclose(sb, sl, rtol=1e-3, atol=1e-3)  # same scores, batched or looped
    print(f"rose_loop_img_per_s={m / t_l:.1f}")
    print(f"rose_batched_vs_loop={per_image['diag'] / (t_l / m):.3f}  # seconds per image, batched ÷ looped")
    peak = matmul_peak_gflops(dev)
    print(f"matmul_peak_gflops_per_s={peak:.1f}")
    report_floor("rose", gflop(lambda: rose.rose_scores(model, x, eps, {"diag": fits["diag"]}, batch=rows)) / a.n,
                 per_image["diag"], gflop(lambda: rose_loop(model, x[:m], eps[:m], fits)) / m, t_l / m, peak)

    k = torch.randn(a.n, a.iwae_k, 100, device=dev)
    t, _ = timed(lambda: lb.iwae_bpd(model, x, k, rows=rows))
    print(f"nll_img_per_s={a.n / t:.1f}")
    print(f"lratio_img_per_s={a.n / (2 * t):.1f}  # two IWAE likelihoods (main and background model)")
    for codec in ("png", "jp2"):
        tc, _ = timed(partial(lb.complexity_bpd, x, codec))
        print(f"ic_{codec}_img_per_s={a.n / (t + tc):.1f}")

    nb, copies = min(a.n, 64), rows
    et, ee = torch.randn(nb, a.lr_steps, 100, device=dev), torch.randn(nb, a.iwae_k, 100, device=dev)
    t_b, rb = timed(
        lambda: lb.likelihood_regret_batched(model, x[:nb], et, ee, lr=1e-4, batch=copies),
        lambda: lb.likelihood_regret_batched(model, x[:copies], et[:copies], ee[:copies], lr=1e-4, batch=copies),
    )
    t_l, rl = timed(lambda: lb.likelihood_regret_loop(model, x[:m], et[:m], ee[:m], lr=1e-4),
                    lambda: lb.likelihood_regret_loop(model, x[:2], et[:2], ee[:2], lr=1e-4))
    assert torch.allclose(rb[:m], rl, rtol=1e-3, atol=1e-4)  # same scores, batched or looped
    print(f"lr_img_per_s={nb / t_b:.2f}  # {a.lr_steps} steps, {copies} encoder copies per pass")
    print(f"lr_loop_img_per_s={m / t_l:.2f}")
    print(f"lr_batched_vs_loop={(t_b / nb) / (t_l / m):.3f}  # seconds per image, batched ÷ looped")
    report_floor(
        "lr",
        gflop(lambda: lb.likelihood_regret_batched(model, x[:nb], et, ee, lr=1e-4, batch=copies)) / nb,
        t_b / nb,
        gflop(lambda: lb.likelihood_regret_loop(model, x[:m], et[:m], ee[:m], lr=1e-4)) / m,
        t_l / m,
        peak,
    )


if __name__ == "__main__":
    main()
