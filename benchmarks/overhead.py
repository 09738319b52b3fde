"""How much do Ray Tune + Optuna + MLflow cost on top of bare training, and how much
faster is batching by tensor slicing than a DataLoader?

    python benchmarks/overhead.py              # ~10 min on 2 CPU cores: 2 trials of 5 epochs, 3 times
    python benchmarks/overhead.py --epochs 3   # shorter trials: the fixed cost weighs more
    python benchmarks/overhead.py --quick      # ~1 min: short trials (overhead ratio not meaningful)

Prints ``study_overhead_ratio=X``: study wall time ÷ the same trials as bare loops in this
process (the mean of a run before and one after the study), and
``slicing_vs_dataloader_ratio=Y``: one epoch of batches by slicing a uint8 tensor ÷ the same
epoch from a shuffling DataLoader. The study's cost splits into a fixed part per study
(``fixed_overhead_s``: Ray start and stop, store set-up, the first worker, plots) and a part
per epoch (``trial_time_ratio``: the trials' own time inside Tune, Tune's ``time_total_s``,
÷ the bare loops), so the ratio falls as trials get longer.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from oodlab import data
from oodlab.registry import run_trial
from oodlab.runner import run_spec
from oodlab.study import configure_logging, parse_args


def _best_of_interleaved(fns: list, repeats: int = 7) -> list[float]:
    """Fastest of ``repeats`` timed runs of each function, taking turns, so a burst of load on a
    shared machine slows both sides alike instead of one (the first run pays for caches)."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def slicing_vs_dataloader(batch_size: int = 50, device: str = "cpu") -> tuple[float, float]:
    """Seconds for one shuffled epoch of float batches: (tensor slicing, DataLoader), best of 7."""
    x = data.load("fashion_mnist", "train", device=device).x
    gen = torch.Generator().manual_seed(0)

    def slicing() -> None:
        for idx in data.batch_indices(len(x), batch_size, shuffle=True, generator=gen, device=x.device):
            data.to_float(x[idx])

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.cpu()), batch_size=batch_size, shuffle=True)

    def dataloader() -> None:
        for (b,) in loader:
            data.to_float(b.to(device, non_blocking=True))

    t_slice, t_loader = _best_of_interleaved([slicing, dataloader])
    return t_slice, t_loader


def study_overhead(train_n: int, epochs: int, shifts: str) -> tuple[float, float, float, float]:
    """Seconds for the same trials (a) as a study through Ray+Optuna+MLflow, one at a time
    with every core, (b) the trials' own time inside it (Tune's ``time_total_s``), and as
    bare ``run_trial`` loops in this process (c) before and (d) after the study. Bracketing
    the study by two bare runs averages out the drift of a shared (virtual) machine, which
    moves a 2-minute trial by 10-20% between runs here."""
    study = runpy.run_path(str(REPO / "studies" / "negprior_shift.py"))
    argv = ["--shifts", shifts, "--epochs", str(epochs), "--train-n", str(train_n), "--test-n", "2000",
            "--max-concurrent", "1", "--cpus-per-trial", str(torch.get_num_threads())]
    with tempfile.TemporaryDirectory() as d:
        args = parse_args("negprior_shift.py", study["configure"], argv + ["--storage", d, "--name", "overhead"])
        spec = study["build"](args)

        def bare() -> float:
            t0 = time.perf_counter()
            for shift in spec.grid["shift"].grid("shift"):
                run_trial({**spec.fixed, "shift": shift, "seed": 0, "device": "cpu"})
            return time.perf_counter() - t0

        t_before = bare()
        configure_logging(verbose=False)  # as `python studies/negprior_shift.py` runs it
        t0 = time.perf_counter()
        run_spec(spec, args)
        t_study = time.perf_counter() - t0
        t_trials = sum(json.loads(f.read_text().splitlines()[-1])["time_total_s"]
                       for f in (Path(d) / "ray" / "overhead").glob("trial_*/result.json"))
        return t_study, t_trials, t_before, bare()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short trials: checks the script, not the ratio")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-study", action="store_true", help="only the data-path benchmark")
    p.add_argument("--epochs", type=int, default=5, help="epochs per trial (default 5: ~2 min trials on 2 cores)")
    a = p.parse_args()
    t_slice, t_loader = slicing_vs_dataloader(device=a.device)
    print(f"slicing_epoch_s={t_slice:.3f} dataloader_epoch_s={t_loader:.3f} device={a.device}")
    print(f"slicing_vs_dataloader_ratio={t_slice / t_loader:.3f}", flush=True)
    if a.skip_study:
        return
    train_n, epochs = (2000, 1) if a.quick else (60000, a.epochs)
    t_study, t_trials, t_before, t_after = study_overhead(train_n, epochs, "2,8")
    t_bare = (t_before + t_after) / 2
    print(f"study_wall_s={t_study:.1f} trials_in_tune_s={t_trials:.1f} bare_wall_s={t_bare:.1f} "
          f"(before {t_before:.1f}, after {t_after:.1f}) trials=2 epochs={epochs} train_n={train_n}")
    print(f"fixed_overhead_s={t_study - t_trials:.1f} trial_time_ratio={t_trials / t_bare:.3f}")
    print(f"study_overhead_ratio={t_study / t_bare:.3f}", flush=True)


if __name__ == "__main__":
    main()
