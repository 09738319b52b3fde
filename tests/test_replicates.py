"""Seeds as replicates: fused and looped training agree, a checkpoint holds every replica, the
reported table is the mean and sd over seeds, and one rule gives a metric's direction."""

import math

import numpy as np
import pytest
import torch

from oodlab import naming, selection
from oodlab.replicates import Replicates, mean_and_sd
from oodlab.trials import group

TINY = dict(method="negprior", negatives="aux", epochs=2, train_n=300, test_n=50, val_n=50, pad=True,
            device="cpu", seeds=2)
# Fused (vmap over stacked weights) and looped replicas do the same arithmetic in another order, so
# float32 rounding differs, and training amplifies it (a chaotic system): after one epoch (6 steps)
# loss terms agree to < 1e-5 relative; after 12 steps one baseline replica's ID KL already differs
# by 0.5%. The tolerances below hold for one epoch.
LOSS_RTOL, SCORE_RTOL = 1e-4, 1e-3


@pytest.mark.parametrize("negatives", ["aux", "none"])
def test_fused_and_looped_replicates_train_alike(negatives):
    runs = {}
    for fuse in ("looped", "fused"):
        r = Replicates({**TINY, "negatives": negatives, "fuse": fuse, "epochs": 1})
        assert r.mode == fuse
        runs[fuse] = [r.step()]
    for looped, fused in zip(runs["looped"], runs["fused"]):
        assert looped.replicas.keys() == fused.replicas.keys() == {0, 1}
        for seed in (0, 1):
            a, b = looped.replicas[seed], fused.replicas[seed]
            for k in a.train:
                assert b.train[k] == pytest.approx(a.train[k], rel=LOSS_RTOL), (seed, k)
            for name, scores in a.scores.items():  # scores, not rank metrics: one flipped pair moves an FPR by 1/n
                for score, v in scores.items():
                    np.testing.assert_allclose(b.scores[name][score], v, rtol=SCORE_RTOL, err_msg=f"{name} {score}")
    seeds = runs["looped"][0].replicas
    assert seeds[0].train["loss"] != seeds[1].train["loss"]  # two seeds, two different runs


def test_a_replicate_is_the_trial_of_its_seed():
    """Replicate 1 of a two-seed trial trains like a one-seed trial with seed 1 (init, batches, draws)."""
    pair = Replicates({**TINY, "epochs": 1, "fuse": "looped"}).step().replicas[1]
    alone = Replicates({**TINY, "epochs": 1, "seeds": 1, "seed": 1}).step()
    assert pair.train == pytest.approx(alone.train, rel=1e-6)


def test_the_report_is_the_mean_and_sd_over_seeds():
    res = Replicates({**TINY, "epochs": 1, "fuse": "looped"}).step()
    name = "val_auroc_constant_bpd"
    values = [r.metrics[name] for r in res.replicas.values()]
    assert res.metrics[name] == pytest.approx(np.mean(values))
    assert res.metrics[name + naming.SD] == pytest.approx(np.std(values, ddof=1))
    assert mean_and_sd([{"a": 1.0}]) == {"a": 1.0}  # one seed: no sd


def test_one_checkpoint_holds_every_replica_and_resumes_fused_or_looped(tmp_path):
    """A checkpoint of a fused trial restores into a looped one (and back): same format, same next epoch."""
    fused = Replicates({**TINY, "fuse": "fused"})
    fused.step()
    torch.save(fused.state_dict(), tmp_path / "state.pt")
    expected = fused.step()
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert len(state["replicas"]) == 2 and state["seeds"] == [0, 1]
    for fuse in ("looped", "fused"):
        again = Replicates({**TINY, "fuse": fuse})
        again.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))  # optimizers train it in place
        assert again.epoch == 1
        res = again.step()
        for seed in (0, 1):
            for k, v in expected.replicas[seed].train.items():
                assert res.replicas[seed].train[k] == pytest.approx(v, rel=LOSS_RTOL), (fuse, seed, k)
    with pytest.raises(ValueError, match="holds 2 replicate"):
        Replicates({**TINY, "seeds": 3}).load_state_dict(state)


def test_methods_that_cannot_fuse_loop():
    r = Replicates({**TINY, "negatives": "adversarial", "fuse": "fused", "epochs": 1})
    assert r.mode == "looped"
    assert Replicates({**TINY, "fuse": "auto"}).mode == "looped"  # on a CPU, by measurement


@pytest.mark.parametrize("metric, mode", [
    ("val_auroc_blobs_bpd", "max"), ("auroc_mnist_kl", "max"), ("val_aupr_in_constant_bpd", "max"),
    ("val_fpr95_blobs_bpd", "min"), ("val_fpr80_oodpos_blobs_bpd", "min"), ("fpr95_mnist_bpd", "min"),
    ("val_detection_error_constant_kl", "min"), ("detection_error_mnist_bpd", "min"),
    ("val_id_bpd", "min"), ("val_nll_mean", "min"), ("bpd_mean", "min"), ("acc_n1", "max"),
])
def test_one_direction_rule_for_study_selection_and_report(metric, mode):
    from oodlab.study import _targets

    assert naming.mode_of(metric) == mode
    assert selection.targets_of({"metric": metric}) == ([metric], [mode])

    class Spec:
        metric, mode = "x", "max"

    class Args:
        target, mode = metric, None

    assert _targets(Spec(), Args(), {}) == ((metric,), (mode,))  # a --target without --mode


def test_agreement_between_validation_and_test_ranks():
    def cfg(shift, val, test, seeds=2):
        return [({"shift": str(shift), "seed": str(s), "ood": "mnist", "val_ood": "constant"},
                 {"val_auroc_constant_bpd": val + 0.01 * s, "auroc_mnist_bpd": test + 0.01 * s,
                  "auroc_mnist_n_5_bpd": 1 - test, "fpr95_oodpos_mnist_bpd": 0.5, "fpr95_mnist_bpd": 0.4,
                  "val_id_bpd": 3.0}) for s in range(seeds)]

    groups = group([*cfg(2, 0.6, 0.5), *cfg(4, 0.7, 0.6), *cfg(6, 0.8, 0.9), *cfg(8, 0.9, 0.95)])
    assert len(groups) == 4 and all(len(g.metrics) == 2 for g in groups)  # seeds group into a configuration
    by = {a.test_metric: a for a in selection.agreement(groups, "val_auroc_constant_bpd")}
    assert set(by) == {"auroc_mnist_bpd", "auroc_mnist_n_5_bpd"}
    assert by["auroc_mnist_bpd"].tau == pytest.approx(1.0) and not by["auroc_mnist_bpd"].weak
    assert by["auroc_mnist_n_5_bpd"].tau == pytest.approx(-1.0) and by["auroc_mnist_n_5_bpd"].weak
    md = selection.agreement_markdown(list(by.values()))
    assert "Warning: `val_auroc_constant_bpd` ranks configurations against `auroc_mnist_n_5_bpd`" in md
    fpr = selection.agreement(groups, "val_fpr95_constant_bpd")
    assert [a.test_metric for a in fpr] == ["fpr95_mnist_bpd"]  # not the OOD-positive fpr95_oodpos
    assert math.isnan(selection.agreement(groups[:2], "val_auroc_constant_bpd")[0].tau)  # too few to rank


def test_report_tables_print_searched_values_to_four_significant_digits():
    assert selection.value_text("0.00011423254155608379") == "0.0001142"
    assert [selection.value_text(v) for v in ("2.0", "8", "aux", "6.390512")] == ["2.0", "8", "aux", "6.391"]
