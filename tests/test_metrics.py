"""metrics.ood_metrics: higher score = more OOD; AUROC/AUPR agree with scikit-learn; FPR in both
conventions: ``fpr95``/``fpr80`` ID positive (paper 002, OpenOOD: the threshold keeps 95% / 80% of ID,
FPR = share of OOD accepted), ``fpr95_oodpos``/``fpr80_oodpos`` OOD positive (paper 004: the
threshold catches 95% / 80% of OOD, FPR = share of ID flagged as OOD)."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from oodlab.metrics import METRICS, ood_metrics


def test_matches_sklearn_on_random_scores():
    rng = np.random.default_rng(0)
    s_in, s_out = rng.normal(0, 1, 700), rng.normal(0.8, 1.3, 400)
    m = ood_metrics(s_in, s_out)
    y = np.r_[np.zeros(700), np.ones(400)]
    s = np.r_[s_in, s_out]
    assert set(m) == set(METRICS)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert m["aupr_out"] == pytest.approx(average_precision_score(y, s))
    assert m["aupr_in"] == pytest.approx(average_precision_score(1 - y, -s))
    assert 0.6 < m["auroc"] < 0.8


def test_fpr95_and_detection_error_by_brute_force():
    rng = np.random.default_rng(1)
    s_in, s_out = rng.normal(0, 1, 500), rng.normal(1.5, 1, 300)
    m = ood_metrics(s_in, s_out)
    thresholds = np.unique(np.r_[s_in, s_out, np.inf])
    tpr = np.array([(s_out >= t).mean() for t in thresholds])
    fpr = np.array([(s_in >= t).mean() for t in thresholds])
    id_kept = np.array([(s_in <= t).mean() for t in thresholds])  # accepted as ID: score <= t
    ood_kept = np.array([(s_out <= t).mean() for t in thresholds])
    assert m["fpr95"] == pytest.approx(ood_kept[id_kept >= 0.95].min())
    assert m["fpr80"] == pytest.approx(ood_kept[id_kept >= 0.80].min())
    assert m["fpr95_oodpos"] == pytest.approx(fpr[tpr >= 0.95].min())
    assert m["fpr80_oodpos"] == pytest.approx(fpr[tpr >= 0.80].min())
    assert m["detection_error"] == pytest.approx(np.min(0.5 * (1 - tpr) + 0.5 * fpr))


def test_fpr_is_the_papers_id_positive_convention():
    """ID N(0, 1) vs OOD N(1, 0.3²): keeping 95% of ID (t = 1.645) accepts Φ(0.645/0.3) = 0.984
    of OOD; the OOD-positive quantity (ID flagged at 95% OOD recall) would be 0.306."""
    rng = np.random.default_rng(0)
    s_in, s_out = rng.normal(0, 1, 200_000), rng.normal(1, 0.3, 200_000)
    m = ood_metrics(s_in, s_out)
    assert m["auroc"] == pytest.approx(0.84, abs=0.01)
    assert m["fpr95"] == pytest.approx(0.984, abs=0.005)
    assert m["fpr80"] == pytest.approx(0.299, abs=0.005)  # t = 0.842: Φ(-0.158/0.3)
    # swapping the shapes (ID narrow, OOD wide) gives the other convention's 0.306
    assert ood_metrics(s_out - 1, s_in + 1)["fpr95"] == pytest.approx(0.306, abs=0.005)


def test_both_fpr_conventions_on_a_known_answer():
    """ID scores 0..9; OOD 5.5 and 20..28. ID positive: keeping 95% (t = 9) or 80% (t = 7) of ID
    accepts only the OOD 5.5 -> 0.1. OOD positive: catching 80% of OOD (t = 21) flags no ID image
    -> 0; catching 95% needs every OOD image (t = 5.5), which flags ID 6, 7, 8, 9 -> 0.4."""
    m = ood_metrics(np.arange(10.0), np.r_[5.5, np.arange(20.0, 29.0)])
    assert (m["fpr95"], m["fpr80"]) == (0.1, 0.1)
    assert (m["fpr95_oodpos"], m["fpr80_oodpos"]) == (0.4, 0.0)


def test_oodpos_fpr_on_gaussians():
    """ID N(0, 1) vs OOD N(1, 0.3²): catching 95% of OOD (t = 1 − 1.645·0.3) flags Φ(−0.507) = 0.306 of
    ID; catching 80% (t = 1 − 0.842·0.3) flags Φ(−0.747) = 0.227."""
    rng = np.random.default_rng(0)
    m = ood_metrics(rng.normal(0, 1, 200_000), rng.normal(1, 0.3, 200_000))
    assert m["fpr95_oodpos"] == pytest.approx(0.306, abs=0.005)
    assert m["fpr80_oodpos"] == pytest.approx(0.227, abs=0.005)


def test_separated_constant_and_reversed():
    perfect = ood_metrics(np.zeros(10), np.ones(10))
    assert perfect["auroc"] == 1.0 and perfect["fpr95"] == 0.0 and perfect["detection_error"] == 0.0
    assert perfect["fpr95_oodpos"] == 0.0 and perfect["fpr80_oodpos"] == 0.0
    assert perfect["aupr_in"] == 1.0 and perfect["aupr_out"] == 1.0
    const = ood_metrics(np.ones(10), np.ones(30))
    assert const["auroc"] == 0.5 and const["fpr95"] == 1.0 and const["fpr80_oodpos"] == 1.0
    assert ood_metrics(np.ones(10), np.zeros(10))["auroc"] == 0.0  # sign matters: higher = more OOD


def test_bad_scores_raise():
    with pytest.raises(ValueError, match="non-finite"):
        ood_metrics(np.array([0.0, np.nan]), np.ones(3))
    with pytest.raises(ValueError, match="at least one"):
        ood_metrics(np.array([]), np.ones(3))
