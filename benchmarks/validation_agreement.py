"""Does the validation target rank configurations like the test metric? (README: Validation protocol)

Trains a few negative-prior configurations with ``run_trial`` (no Ray) and prints, per
configuration, one JSON line with the validation AUROCs (held-out Fashion-MNIST training
images vs blobs / constant), the test AUROC (Fashion-MNIST test vs MNIST) and ``val_id_bpd``:

    python benchmarks/validation_agreement.py
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from oodlab.registry import run_trial

KEYS = ("val_auroc_blobs_bpd", "val_auroc_constant_bpd", "auroc_mnist_bpd",
        "val_auroc_blobs_kl", "val_auroc_constant_kl", "auroc_mnist_kl", "val_id_bpd")


def main() -> None:
    for neg, shift in (("none", 8.0), ("aux", 2.0), ("aux", 5.0), ("aux", 8.0)):
        t0 = time.perf_counter()
        cfg = dict(negatives=neg, shift=shift, aux="omniglot", aux_split="train", train_n=2000, val_n=5000,
                   test_n=500, epochs=2, lr=1e-3, seed=0, device="cpu")
        m = run_trial(cfg).metrics
        print(json.dumps({"negatives": neg, "shift": shift, "s": round(time.perf_counter() - t0),
                          **{k: round(m[k], 3) for k in KEYS}}), flush=True)


if __name__ == "__main__":
    main()
