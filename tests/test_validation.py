"""The validation protocol: ID holdout, validation-OOD sets disjoint from test and training sets,
``val_`` metric names (each method's trial test checks its report: conftest's
``assert_reports_validation_and_test_metrics``)."""

import numpy as np
import pytest
import torch

from oodlab import data
from oodlab.experiment import ConfigError, is_val_metric, load_sets, metric_name, val_id_name
from oodlab.metrics import METRICS
from oodlab.registry import build_config


def _indexed(n: int) -> data.ImageSet:
    """A set whose labels are the image indices, to track which images go where."""
    return data.ImageSet(torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8), torch.arange(n), "indexed")


def test_holdout_is_disjoint_complete_and_stable():
    s = _indexed(1000)
    rest, held = data.holdout(s, 100)
    assert len(held) == 100 and len(rest) == 900
    assert set(held.y.tolist()).isdisjoint(rest.y.tolist())
    assert sorted(held.y.tolist() + rest.y.tolist()) == list(range(1000))
    assert torch.equal(rest.y, rest.y.sort().values)  # the rest keeps its original order
    assert torch.equal(rest.x, s.x[rest.y]) and torch.equal(held.x, s.x[held.y])
    assert torch.equal(data.holdout(s, 100)[1].y, held.y)  # fixed seed: the same images every call
    assert set(data.holdout(s, 50)[1].y.tolist()) < set(held.y.tolist())  # a smaller holdout is a subset
    for bad in (0, 1000, 2000):
        with pytest.raises(data.DataError, match="hold out"):
            data.holdout(s, bad)


def test_real_holdout_precedes_train_n_and_never_overlaps():
    base = dict(val_n=500, test_n=None, device="cpu")
    full, sets = load_sets(build_config(base), torch.device("cpu"))
    small, sets_small = load_sets(build_config({**base, "train_n": 300}), torch.device("cpu"))
    assert len(full) == 60_000 - 500 and len(sets["val_id"]) == 500
    assert torch.equal(sets["val_id"].x, sets_small["val_id"].x)  # train_n does not move the validation images
    assert torch.equal(small.x, full.x[:300])
    # by index: the held-out images are exactly the complement of the training images
    raw = data.load("fashion_mnist", "train")
    idx = torch.randperm(60_000, generator=torch.Generator().manual_seed(data.HOLDOUT_SEED))[:500]
    assert torch.equal(sets["val_id"].x, raw.x[idx])
    keep = torch.ones(60_000, dtype=torch.bool)
    keep[idx] = False
    assert torch.equal(full.x, raw.x[keep])
    assert {"id", "mnist", "val_id", "val_blobs", "val_constant"} == set(sets)


def test_test_n_caps_every_scored_set():
    _, sets = load_sets(build_config(dict(val_n=500, test_n=40, device="cpu")), torch.device("cpu"))
    assert {k: len(v) for k, v in sets.items()} == {k: 40 for k in sets}


def test_synthetic_validation_sets_take_the_id_shape():
    assert data.at_shape("blobs", (3, 32, 32)) == "blobs[channels=3,size=32]"
    assert data.at_shape("blobs[n=50]", (3, 32, 32)) == "blobs[n=50,channels=3,size=32]"
    assert data.at_shape("blobs[size=28]", (3, 32, 32)) == "blobs[size=28]"  # given explicitly: kept
    assert data.at_shape("mnist", (3, 32, 32)) == "mnist"  # real sets keep their shape (and must match)
    cfg = build_config(dict(id="fashion_mnist[n=200,channels=3,size=32]", ood="mnist[n=100,channels=3,size=32]",
                            train_n=50, test_n=20, val_n=30, device="cpu"))  # n= first: only those are resized
    cfg.check_data({req: data.SetInfo(100, (3, 32, 32) if "32" in req[0] else (1, 28, 28), ())
                    for req in cfg.data_requests()})
    _, sets = load_sets(cfg, torch.device("cpu"))
    assert {k: s.shape for k, s in sets.items()} == {k: (3, 32, 32) for k in sets}
    _, padded = load_sets(build_config(dict(pad=True, test_n=20, val_n=30, device="cpu")), torch.device("cpu"))
    assert torch.equal(padded["val_blobs"].x[..., :2, :], torch.zeros_like(padded["val_blobs"].x[..., :2, :]))


def test_metric_names():
    assert metric_name("auroc", "mnist", "bpd") == "auroc_mnist_bpd"
    assert metric_name("auroc", "fashion_mnist[labels=5-9]", "bpd", "val") == "val_auroc_fashion_mnist_labels_5_9_bpd"
    assert val_id_name("bpd") == "val_id_bpd"
    assert is_val_metric("val_auroc_blobs_bpd") and not is_val_metric("auroc_mnist_bpd")
    with pytest.raises(ValueError):
        metric_name("auroc", "mnist", "bpd", "train")
    cfg = build_config(dict(ood="mnist,omniglot", val_ood="blobs"))
    names = cfg.metric_names()
    for m in METRICS:
        for s in ("bpd", "kl"):
            assert {f"{m}_mnist_{s}", f"{m}_omniglot_{s}", f"val_{m}_blobs_{s}"} <= set(names)
    assert {"val_id_bpd", "val_id_kl"} <= set(names)
    assert len(names) == len(set(names)) == 3 * len(METRICS) * 2 + 2


@pytest.mark.parametrize("cfg, match", [
    (dict(val_ood="mnist"), "test OOD set 'mnist'"),
    (dict(val_ood="mnist[brightness=0.5]"), "test OOD set 'mnist'"),  # same images, other brightness
    (dict(ood="mnist,gaussian_noise", val_ood="gaussian_noise[size=28,n=100]"), "test OOD set 'gaussian_noise'"),
    (dict(method="rose", val_ood="blobs,constant"), "test OOD set 'constant'"),  # part of "overall" too
    (dict(method="rose", ood="overall", val_ood="omniglot"), "test OOD set 'overall'"),
    (dict(negatives="aux", aux="notmnist", val_ood="notmnist"), "training set 'notmnist'"),
    (dict(negatives="random", val_ood="uniform_noise"), "training set 'uniform_noise'"),
    (dict(negatives="gaussian_noise", val_ood="blobs,gaussian_noise"), "training set 'gaussian_noise'"),
    (dict(val_ood="fashion_mnist[labels=3]"), "the ID set"),
    (dict(method="mixture", val_ood="fashion_mnist[labels=7,8]"), "the ID set"),
    (dict(method="oodgen", val_ood="fashion_mnist[labels=9]"), "test OOD set 'fashion_mnist\\[labels=5-9\\]'"),
    (dict(val_ood=""), "at least one validation OOD set"),
    (dict(val_n=0), "val_n must be >= 1"),
    (dict(val_ood="blobs,blobs"), "distinct names"),
])
def test_validation_sets_must_be_disjoint_from_test_and_training(cfg, match):
    with pytest.raises(ConfigError, match=match):
        build_config(cfg)


def test_set_names_cannot_collide_with_validation_keys(tmp_path):
    np.savez(tmp_path / "val_x.npz", x=np.zeros((5, 28, 28), np.uint8))
    with pytest.raises(ConfigError, match="may not be 'id' or start with 'val_'"):
        build_config(dict(ood=f"npz:{tmp_path}/val_x.npz"))


def test_disjoint_choices_are_accepted():
    assert build_config(dict(method="mixture")).val_ood == ("blobs", "fashion_mnist[labels=0,2-6,8,9]")
    build_config(dict(negatives="aux", aux="omniglot", val_ood="notmnist"))  # the aux set is omniglot here
    build_config(dict(negatives="none", val_ood="notmnist"))  # no negatives: the aux field is unused
    build_config(dict(method="oodgen", id="fashion_mnist[labels=0-4]", ood="mnist",
                      val_ood="fashion_mnist[labels=5-9]"))


def test_every_method_default_is_valid():
    for method in ("negprior", "mixture", "oodgen", "rose"):
        cfg = build_config({"method": method})
        assert cfg.val_ood and cfg.val_n >= 1


def test_val_n_too_large_fails_before_compute():
    cfg = build_config(dict(method="mixture", val_n=12_000, device="cpu"))  # classes 1,7: 12,000 images
    with pytest.raises(ConfigError, match="val_n=12000 but the ID training set"):
        cfg.check_sizes({(cfg.id, "train"): 12_000})
    with pytest.raises(ConfigError, match="val_n=12000"):
        load_sets(cfg, torch.device("cpu"))
    cfg.check_sizes({(cfg.id, "train"): 12_001})


def test_config_round_trips_through_a_flat_dict():
    cfg = build_config(dict(id="fashion_mnist[labels=1,7]", val_ood="blobs,fashion_mnist[labels=0,2]", ood="mnist",
                            val_n=123))
    d = cfg.to_dict()
    assert d["val_ood"] == "blobs,fashion_mnist[labels=0,2]" and d["val_n"] == 123
    assert build_config(d) == cfg


# ---------------------------------------------------------------- selection (oodlab report)

def _write_study(tmp_path, target: str, mode: str | None = None, allow: bool = False) -> None:
    """A study in a real MLflow sqlite store: shift 2 wins on validation, shift 8 on test."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("s", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"oodlab.role": "parent"}).info.run_id
    client.log_param(parent, "metric", target)
    if allow:
        client.set_tag(parent, "oodlab.allow_test_target", "true")
    if mode:
        client.log_param(parent, "mode", mode)
    for shift, val, test in ((2.0, (0.90, 0.80), (0.60, 0.62)), (8.0, (0.70, 0.72), (0.99, 0.97))):
        for seed in (0, 1):
            run = client.create_run(exp, tags={"oodlab.role": "trial"}).info.run_id
            for k, v in dict(shift=shift, seed=seed, id="fashion_mnist", ood="mnist", val_ood="blobs").items():
                client.log_param(run, k, v)
            for k, v in {"val_auroc_blobs_bpd": val[seed], "val_id_bpd": 0.3 + shift / 100,
                         "auroc_mnist_bpd": test[seed], "fpr95_mnist_bpd": 1 - test[seed]}.items():
                client.log_metric(run, k, v)
            client.set_terminated(run)
    # a trial ASHA stopped early at a lucky validation value: it must not be selected
    run = client.create_run(exp, tags={"oodlab.role": "trial", "oodlab.stopped_early": "true"}).info.run_id
    for k, v in dict(shift=5.0, seed=0, id="fashion_mnist", ood="mnist", val_ood="blobs").items():
        client.log_param(run, k, v)
    client.log_metric(run, "val_auroc_blobs_bpd", 0.99)
    client.log_metric(run, "auroc_mnist_bpd", 0.5)
    client.set_terminated(run)
    client.set_terminated(parent)


def test_report_selects_by_validation_and_shows_test_metrics(tmp_path):
    from oodlab.report import report

    _write_study(tmp_path, "val_auroc_blobs_bpd")
    md = report(tmp_path, "s")
    head = md.split("## Test metrics")[0]
    assert "selected by `val_auroc_blobs_bpd` (max)" in head and "Warning" not in head
    assert "| 2.0 | 2 | 0.850 (0.071) |" in head  # shift 2: best mean validation AUROC, 2 seeds
    sel = md.split("## Test metrics of shift=2.0")[1].split("#")[0]
    assert "| `auroc_mnist_bpd` | 0.610 (0.014) |" in sel  # its test AUROC, although shift 8 tests better
    assert "0.980" not in sel and "shift=5.0" not in md.split("# s: test AUROC")[0]  # stopped early: not selectable


def test_report_flags_a_test_target(tmp_path):
    from oodlab.report import report

    _write_study(tmp_path, "auroc_mnist_bpd", allow=True)
    md = report(tmp_path, "s")
    assert "Warning: selected on TEST metric(s) auroc_mnist_bpd** (allowed by the study's explicit" in md
    assert "## Test metrics of shift=8.0" in md


def test_selection_modes_and_pareto_front():
    from oodlab import selection
    from oodlab.trials import group

    assert selection.targets_of({"metric": "val_auroc_blobs_bpd,val_id_bpd", "mode": "max,min"}) == \
        (["val_auroc_blobs_bpd", "val_id_bpd"], ["max", "min"])
    trials = [({"a": str(a), "seed": "0"}, {"v": v, "b": b}) for a, v, b in
              ((1, 0.9, 3.0), (2, 0.8, 2.0), (3, 0.7, 2.5), (4, 0.9, 3.5))]
    groups = group(trials)
    assert [dict(g.config)["a"] for g in selection.select(groups, ["v"], ["max"])] == ["1", "4"]  # a tie keeps both
    front = selection.select(groups, ["v", "b"], ["max", "min"])
    assert sorted(dict(g.config)["a"] for g in front) == ["1", "2"]  # 3 and 4 are dominated
