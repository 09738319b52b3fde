"""OOD detection metrics; scores: higher = more OOD.

``ood_metrics(score_in, score_out)`` returns a flat dict with stable keys. Conventions:

* ``auroc``            area under the ROC curve, OOD = positive (scikit-learn's ``roc_auc_score``)
* ``aupr_out``         average precision (scikit-learn, step-wise sum, not the trapezoid rule),
                       OOD = positive
* ``aupr_in``          average precision, ID = positive (scores negated)
* ``fpr95`` / ``fpr80`` ID = positive (OpenOOD; paper 002 App. C and its notebook): the threshold
                       keeps (accepts as ID) at least 95% / 80% of the ID images; the figure is
                       the fraction of OOD images accepted as ID
* ``fpr95_oodpos`` / ``fpr80_oodpos`` OOD = positive (paper 004 Tables 4-5, its ``FPR80``
                       notebook): the threshold catches (flags as OOD) at least 95% / 80% of the OOD
                       images; the figure is the fraction of ID images flagged as OOD. Paper 004's
                       Table 5 is this quantity: the authors' stored ROSE-EKFAC scores
                       (shinypond/ood_detection, ``code/npy/ROSE/VAE_fmnist``) give MNIST 0.0068,
                       noise 0.0124, overall 0.0020 (Table 5: 0.007, 0.012, 0.002) and 0.000 for
                       every set under the ID-positive ``fpr80``.
* ``detection_error``  min over thresholds of ½ P(ID rejected) + ½ P(OOD accepted); the same
                       under either choice of positive class
"""

from __future__ import annotations

import numpy as np

# scikit-learn is imported where it is used: it costs ~1 s, and a study refusing bad input
# before any compute should not pay for it.

METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr80", "fpr95_oodpos", "fpr80_oodpos", "detection_error")


def _labelled(score_in: np.ndarray, score_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    score_in, score_out = np.asarray(score_in, np.float64).ravel(), np.asarray(score_out, np.float64).ravel()
    if score_in.size == 0 or score_out.size == 0:
        raise ValueError("ood_metrics needs at least one ID and one OOD score")
    scores = np.concatenate([score_in, score_out])
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"scores contain {np.count_nonzero(~np.isfinite(scores))} non-finite values")
    labels = np.concatenate([np.zeros(score_in.size), np.ones(score_out.size)])
    return scores, labels


def fpr_at_tpr(fpr: np.ndarray, tpr: np.ndarray, level: float) -> float:
    """Smallest FPR among ROC points whose TPR reaches ``level``."""
    return float(fpr[np.searchsorted(tpr, level, side="left")])


def roc(score_in: np.ndarray, score_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the ROC curve, OOD positive."""
    from sklearn.metrics import roc_curve

    scores, labels = _labelled(score_in, score_out)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=True)  # collinear points dropped: same curve
    return fpr, tpr


def ood_metrics(score_in: np.ndarray, score_out: np.ndarray) -> dict[str, float]:
    """Every metric of ``METRICS`` for ID scores ``score_in`` and OOD scores ``score_out`` (higher = more OOD)."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    scores, labels = _labelled(score_in, score_out)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    # ID positive, low score = ID: x-axis = OOD accepted as ID, y-axis = ID accepted.
    ood_accepted, id_accepted, _ = roc_curve(1 - labels, -scores, drop_intermediate=False)
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "aupr_in": float(average_precision_score(1 - labels, -scores)),
        "aupr_out": float(average_precision_score(labels, scores)),
        "fpr95": fpr_at_tpr(ood_accepted, id_accepted, 0.95),
        "fpr80": fpr_at_tpr(ood_accepted, id_accepted, 0.80),
        # OOD positive, high score = OOD: x-axis = ID flagged as OOD, y-axis = OOD flagged.
        "fpr95_oodpos": fpr_at_tpr(fpr, tpr, 0.95),
        "fpr80_oodpos": fpr_at_tpr(fpr, tpr, 0.80),
        "detection_error": float(np.min(0.5 * (1 - tpr) + 0.5 * fpr)),
    }
