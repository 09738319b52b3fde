"""Negative-prior training on real Fashion-MNIST: the loss moves the right posteriors the right way."""

import pytest
import torch
from conftest import assert_reports_validation_and_test_metrics, assert_resumes_exactly

from oodlab import data
from oodlab.experiment import ConfigError
from oodlab.methods import negprior
from oodlab.methods.negprior import Config, Experiment
from oodlab.models.vae import VAE, VAEConfig
from oodlab.registry import build_config, run_trial


def test_loss_parts_and_baseline():
    torch.manual_seed(0)
    m = VAE(VAEConfig())
    x, xn = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28)
    base = negprior.loss(m, x, None, shift=8.0, neg_weight=1.0)
    assert set(base) == {"loss", "nelbo", "kl"} and base["loss"] == base["nelbo"]
    torch.manual_seed(0)
    withneg = negprior.loss(m, x, xn, shift=8.0, neg_weight=2.0)
    torch.testing.assert_close(withneg["loss"], withneg["nelbo"] + 2.0 * withneg["neg_kl"])
    assert withneg["neg_kl"] > 0


def test_negatives_move_to_shift_and_inliers_stay_near_zero():
    """A sign or target mistake in the negative term shows here after 80 steps (measured: negatives'
    mean 2.96, inliers' 0.79)."""
    cfg = Config(id="fashion_mnist", ood="mnist", aux="notmnist", negatives="aux", shift=4.0,
                 train_n=2000, test_n=200, epochs=1, batch_size=25, lr=1e-3, device="cpu")
    exp = Experiment(cfg)
    exp.train_epoch()
    exp.model.eval()
    with torch.no_grad():
        mu_in, _ = exp.model.encode(data.to_float(exp.test["id"].x))
        mu_neg, _ = exp.model.encode(data.to_float(exp.aux_x[:500]))
    neg, inl = mu_neg.mean().item(), mu_in.mean().item()
    assert neg > 2.5, f"negatives' posterior means should head to shift·1 = 4, got {neg:.2f}"
    assert abs(inl) < 0.5 * neg, f"inliers' means ({inl:.2f}) should stay nearer 0 than the negatives' ({neg:.2f})"


def test_trial_on_real_data_reports_finite_metrics():
    cfg = build_config(dict(train_n=1000, test_n=100, epochs=1, negatives="aux", iwae_k=2, ood="mnist,omniglot",
                            device="cpu"))
    res = run_trial(cfg)
    assert_reports_validation_and_test_metrics(cfg, res)
    for ood in ("mnist", "omniglot"):
        for score in ("bpd", "kl", "iwae"):
            v = res.metrics[f"auroc_{ood}_{score}"]
            assert 0.0 <= v <= 1.0
    assert res.scores["id"]["bpd"].shape == (100,) and res.scores["omniglot"]["kl"].shape == (100,)
    assert res.train["loss"] > 0


def test_checkpoint_resume_is_exact(tmp_path):
    """1 epoch + save + load + 1 epoch == 2 epochs straight (weights_only load)."""
    cfg = Config(train_n=300, test_n=100, epochs=2, negatives="aux", device="cpu")
    assert_resumes_exactly(lambda: Experiment(cfg), tmp_path)


@pytest.mark.parametrize("bad,match", [
    (dict(epochs=0), "epochs"), (dict(lr=-1.0), "lr"), (dict(shift=-1.0), "shift"),
    (dict(decoder="laplace"), "decoder"), (dict(ood="bogus"), "unknown dataset"),
    (dict(negatives="aux", aux="mnist", ood="mnist"), "leak"), (dict(method="nope"), "unknown method"),
    (dict(negatives="bogus"), "negatives"),
])
def test_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        build_config(bad)


def test_unknown_keys_and_shape_mismatch():
    with pytest.raises(ConfigError, match="unknown config keys"):
        build_config({"shfit": 3})
    with pytest.raises(ConfigError, match="shape"):
        Experiment(Config(ood="uniform_noise[channels=3,size=32]", train_n=10, device="cpu"))
