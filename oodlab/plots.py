"""Figures of one trial's scores: ROC curves and score histograms (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from oodlab.metrics import roc


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend; imported late since most code paths draw nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_figure(scores: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """One panel per score; one ROC curve per OOD set (OOD = positive): test sets against the ID
    test set (solid), validation sets (keys ``val_*``) against the ID validation set (dashed)."""
    plt = pyplot()
    names = list(scores["id"])
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), squeeze=False)
    for ax, score in zip(axes[0], names):
        for ood, d in scores.items():
            if ood not in ("id", "val_id"):
                ref = scores["val_id" if ood.startswith("val_") and "val_id" in scores else "id"]
                fpr, tpr = roc(ref[score], d[score])
                ax.plot(fpr, tpr, "--" if ood.startswith("val_") else "-", label=ood)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(title=f"ROC, score={score}", xlabel="FPR (ID flagged OOD)", ylabel="TPR (OOD flagged)")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def histogram_figure(scores: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """One panel per score; overlaid histograms of ID test and each OOD set."""
    plt = pyplot()
    names = list(scores["id"])
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), squeeze=False)
    for ax, score in zip(axes[0], names):
        values = np.concatenate([d[score] for d in scores.values()])
        lo, hi = np.percentile(values, [0.5, 99.5])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 60)
        for name, d in scores.items():  # one filled step patch per set: far cheaper to draw than 60 bars
            density, _ = np.histogram(np.clip(d[score], lo, hi), bins=bins, density=True)
            ax.stairs(density, bins, fill=True, alpha=0.5, label=name)
        ax.set(title=f"{score} (higher = more OOD)", xlabel=score)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
