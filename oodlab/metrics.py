"""OOD detection metrics, OOD = positive class, scores: higher = more OOD.

``ood_metrics(score_in, score_out)`` returns a flat dict with stable keys:

* ``auroc``            area under the ROC curve (scikit-learn's ``roc_auc_score``)
* ``aupr_out``         average precision with OOD as positive
* ``aupr_in``          average precision with ID as positive (scores negated)
* ``fpr95`` / ``fpr80`` fraction of ID samples flagged OOD at the threshold that flags
                       95% / 80% of OOD samples (TPR of the OOD class)
* ``detection_error``  min over thresholds of ½(1 − TPR) + ½ FPR
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr80", "detection_error")


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
    scores, labels = _labelled(score_in, score_out)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return fpr, tpr


def ood_metrics(score_in: np.ndarray, score_out: np.ndarray) -> dict[str, float]:
    scores, labels = _labelled(score_in, score_out)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "aupr_in": float(average_precision_score(1 - labels, -scores)),
        "aupr_out": float(average_precision_score(labels, scores)),
        "fpr95": fpr_at_tpr(fpr, tpr, 0.95),
        "fpr80": fpr_at_tpr(fpr, tpr, 0.80),
        "detection_error": float(np.min(0.5 * (1 - tpr) + 0.5 * fpr)),
    }
