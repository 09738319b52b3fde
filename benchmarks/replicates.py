"""Do replicates inside one trial cost less than the same seeds as separate trials?

    python benchmarks/replicates.py                    # ~6 min on 2 CPU cores (train_n 5000, 5 epochs)
    python benchmarks/replicates.py --device cuda      # on a GPU: also 4 trials sharing it at 0.25 GPU each
    python benchmarks/replicates.py --quick            # ~1 min: 1 epoch of 1000 images (ratio not meaningful)

Both sides run paper 000's VAE (negatives aux, 32×32) through Ray Tune with the project's
trainable, checkpoints every epoch, the same seed-runs and the same resources per trial, with
enough trials to fill the machine, as a study of several configurations does: on a CPU, one
trial per core with **seeds=4** (seeds 4k…4k+3) against **4 trials per core with seeds=1**, one
core each; on a GPU (``--device cuda``), one trial with seeds=4 on the GPU against four trials
sharing it at 0.25 GPU each, and against four trials of a whole GPU one after another. Prints
``replicates_fused_vs_separate=X``: the replicate trials' wall time ÷ the separate trials' wall
time (≤ 1.0: replicates in a trial cost no more than separate trials), and the replicate trials
again with the other training mode (``fuse=fused`` vs ``looped``), so the per-device default of
``TrialConfig.fuse="auto"`` rests on a measurement.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

N = 4


def tune_wall(configs: list[dict[str, Any]], cpu: float, gpu: float, storage: str) -> float:
    """Seconds to run ``configs`` as Tune trials of the project's trainable, as many at once as fit."""
    from ray import tune

    from oodlab.trainable import train

    trainable = tune.with_resources(train, {"cpu": cpu, "gpu": gpu})
    space = {k: tune.grid_search([c[k] for c in configs]) if len({str(c[k]) for c in configs}) > 1 else configs[0][k]
             for k in configs[0]}
    t0 = time.perf_counter()
    grid = tune.Tuner(trainable, param_space=space, tune_config=tune.TuneConfig(reuse_actors=False),
                      run_config=tune.RunConfig(storage_path=storage, verbose=0)).fit()
    wall = time.perf_counter() - t0
    errors = [grid[i].error for i in range(len(grid)) if grid[i].error]
    if errors:
        raise RuntimeError(f"benchmark trial failed: {errors[0]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-n", type=int, default=5000)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.epochs, a.train_n = 1, 1000
    os.environ.setdefault("OODLAB_DATA_DIR", str(REPO.parent / "shared" / "data"))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray
    import torch

    cpus = os.cpu_count() or 1
    gpus = torch.cuda.device_count() if a.device == "cuda" else 0
    ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    base = dict(method="negprior", negatives="aux", pad=True, epochs=a.epochs, train_n=a.train_n, test_n=1000,
                val_n=1000, device=a.device)
    fused_default = "fused" if a.device == "cuda" else "looped"
    other = "looped" if fused_default == "fused" else "fused"
    out: dict[str, float] = {}
    k = cpus if a.device == "cpu" else 1  # replicate trials at once: one per core, or one GPU
    res = (1, 0.0) if a.device == "cpu" else (1, 1.0)
    with tempfile.TemporaryDirectory() as d:
        reps = [dict(base, seeds=N, seed=N * i, fuse=fused_default) for i in range(k)]
        out["replicate_trials_s"] = tune_wall(reps, *res, f"{d}/a")
        separate = [dict(base, seed=s) for s in range(N * k)]
        out["separate_trials_s"] = tune_wall(separate, *((1, 0.0) if a.device == "cpu" else (1, 1 / N)), f"{d}/b")
        out[f"replicate_trials_{other}_s"] = tune_wall([dict(r, fuse=other) for r in reps], *res, f"{d}/c")
        if a.device == "cuda":
            out["separate_trials_whole_gpu_s"] = tune_wall(separate, 1, 1.0, f"{d}/e")
    ray.shutdown()
    name = torch.cuda.get_device_name(0) if a.device == "cuda" else f"CPU, {cpus} cores"
    print(f"device: {name}; {k} trial(s) of {N} seeds vs {N * k} trials; {a.epochs} epochs x {a.train_n} images; "
          f"default mode {fused_default}")
    for key, v in out.items():
        print(f"{key}={v:.1f}")
    print(f"replicates_fused_vs_separate={out['replicate_trials_s'] / out['separate_trials_s']:.3f}")
    print(f"{other}_vs_{fused_default}_in_a_trial={out[f'replicate_trials_{other}_s'] / out['replicate_trials_s']:.3f}")
    if a.device == "cuda":
        print(f"replicates_vs_whole_gpu_trials={out['replicate_trials_s'] / out['separate_trials_whole_gpu_s']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
