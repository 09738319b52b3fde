"""Glow with untrainable mixture priors (papers 001/003, Appendix B): exact log-determinants
against autograd Jacobians, invertibility, actnorm init, and a real trial end to end."""

import math

import numpy as np
import pytest
import torch
from conftest import assert_resumes_exactly

from oodlab.experiment import ConfigError
from oodlab.methods import mixture
from oodlab.mixture_priors import MixturePrior
from oodlab.models import glow
from oodlab.models.glow import ActNorm, AxisLinear, Coupling, Glow, GlowConfig, InvConv1x1, Squeeze
from oodlab.registry import build, build_config, run_trial


def _randomize(m: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (the zero-initialized coupling output included) so no layer is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def _jacobian_logdet(f, x: torch.Tensor) -> float:
    """log|det ∂f(x)/∂x| of one image x (C, H, W) by full autograd Jacobian."""
    j = torch.autograd.functional.jacobian(lambda v: f(v.view(1, *x.shape))[0].flatten(), x.flatten())
    return float(torch.linalg.slogdet(j)[1])


LAYERS = [
    ("actnorm", lambda: ActNorm(4)),
    ("invconv", lambda: InvConv1x1(4)),
    ("coupling", lambda: Coupling(4, 8)),
    ("squeeze", lambda: Squeeze()),
    ("mix_width", lambda: AxisLinear(4, 3)),
    ("mix_height", lambda: AxisLinear(4, 2)),
    ("mix_channel", lambda: AxisLinear(4, 1)),
]


@pytest.mark.parametrize("name,make", LAYERS)
def test_layer_logdet_matches_autograd_jacobian_and_inverts(name, make):
    torch.manual_seed(1)
    layer = _randomize(make().double())
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    if isinstance(layer, ActNorm):
        layer.initialize(torch.randn(8, 4, 4, 4, dtype=torch.float64) * 3 + 1)
        _randomize(layer, 2)
    y, logdet = layer(x)
    logdet = logdet.detach()
    assert logdet.shape == (3,)
    for i in range(3):
        expect = _jacobian_logdet(lambda v: layer(v)[0], x[i])
        assert float(logdet[i]) == pytest.approx(expect, rel=1e-9, abs=1e-9), name
    torch.testing.assert_close(layer.inverse(y), x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("c,size,squeezes", [(1, 4, 2), (2, 4, 1), (3, 4, 1)])
def test_whole_flow_logdet_matches_autograd_jacobian_and_inverts(c, size, squeezes):
    torch.manual_seed(0)
    model = Glow(GlowConfig(channels=c, size=size, steps=3, hidden=8, squeezes=squeezes)).double()
    model.initialize(torch.rand(16, c, size, size, dtype=torch.float64) - 0.5)
    _randomize(model)
    x = torch.rand(2, c, size, size, dtype=torch.float64) - 0.5
    z, logdet = model(x)
    logdet = logdet.detach()
    assert z.shape == (2, c * size * size)
    for i in range(2):
        assert float(logdet[i]) == pytest.approx(_jacobian_logdet(lambda v: model(v)[0], x[i]), rel=1e-9)
    torch.testing.assert_close(model.inverse(z), x, rtol=1e-9, atol=1e-9)


def test_actnorm_data_dependent_init_standardizes_channels():
    x = torch.randn(64, 3, 5, 5, dtype=torch.float64) * torch.tensor([0.1, 2.0, 30.0]).view(1, 3, 1, 1).double() + 7
    layer = ActNorm(3).double()
    assert not bool(layer.initialized)
    y, _ = layer(x)  # the first forward initializes
    assert bool(layer.initialized)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    y2, _ = layer(x * 5)  # later calls do not re-initialize
    torch.testing.assert_close(y2, (x * 5 + layer.bias) * layer.logs.exp())


def test_full_glow_on_mnist_shape_inverts_and_initializes():
    torch.manual_seed(0)
    model = Glow(GlowConfig())  # defaults: 28×28×1, 8 steps, width 64, 2 squeezes
    x = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8)
    y = glow.dequantize(x, torch.Generator().manual_seed(0))
    assert float(y.min()) >= -0.5 and float(y.max()) < 0.5
    torch.testing.assert_close(((y + 0.5) * 256).floor(), x.float())  # noise stays inside each pixel's bin
    model.initialize(y)
    z, _ = model(y)
    assert z.shape == (32, 784)
    torch.testing.assert_close(model.inverse(z), y, rtol=1e-4, atol=1e-4)


def test_nll_is_the_discrete_bound_under_the_full_mixture():
    """−log p(x) = −(log p_mix(z) + log|det|) + D log 256, by hand with torch.distributions."""
    torch.manual_seed(0)
    model = Glow(GlowConfig(channels=1, size=4, steps=2, hidden=8, squeezes=1))
    prior = MixturePrior.build("gaussian", 2, 6.0, 16)
    x = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    model.initialize(glow.dequantize(x))
    ll, z = mixture.glow_log_likelihood(model, prior, x, torch.Generator().manual_seed(3))
    y = glow.dequantize(x, torch.Generator().manual_seed(3))
    z2, logdet = model(y)
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.ones(2)),
        torch.distributions.Independent(torch.distributions.Normal(prior.means, torch.ones(2, 16)), 1))
    torch.testing.assert_close(z, z2)
    torch.testing.assert_close(ll, (ref.log_prob(z2) + logdet - 16 * math.log(256)).detach(), rtol=1e-5, atol=1e-4)
    # Training scores each image under its own component only.
    comp = torch.tensor([0, 1, 1, 0, 1])
    torch.manual_seed(7)
    parts = mixture.glow_loss(model, prior, x, comp)
    torch.manual_seed(7)
    z3, ld3 = model(glow.dequantize(x))
    own = torch.distributions.Normal(prior.means[comp], 1.0).log_prob(z3).sum(1)
    torch.testing.assert_close(parts["loss"], -(own + ld3).mean() + 16 * math.log(256))
    torch.testing.assert_close(parts["bpd"], parts["loss"] / (16 * math.log(2)))


def test_glow_trial_on_fashion_mnist_reports_finite_auroc_and_nll(tmp_path):
    res = run_trial({"method": "mixture", "model": "glow", "id": "fashion_mnist[labels=1,7]", "ood": "mnist",
                     "train_n": 200, "test_n": 50, "epochs": 1, "batch_size": 50, "distance": 100.0,
                     "glow_steps": 2, "glow_hidden": 16, "device": "cpu"})
    m = res.metrics
    assert 0.0 <= m["auroc_mnist_nll"] <= 1.0
    assert all(math.isfinite(m[k]) for k in ("nll_mean_id", "nll_mean_mnist", "nll_gap_mnist"))
    assert math.isfinite(res.train["loss"]) and math.isfinite(res.train["bpd"])
    s = res.scores["id"]["nll"]
    assert s.shape == (50,) and np.all(np.isfinite(s))
    # −log P(x) of discrete 8-bit data is >= 0; a density bug (e.g. a missing −D·log 256) makes it negative.
    assert np.all(s > 0)
    from sklearn.metrics import roc_auc_score

    s_out = res.scores["mnist"]["nll"]
    assert m["auroc_mnist_nll"] == pytest.approx(roc_auc_score([0] * 50 + [1] * 50, np.r_[s, s_out]))


def test_glow_training_pulls_z0_to_each_label_component_and_figures(tmp_path):
    exp = build({"method": "mixture", "model": "glow", "train_n": 200, "test_n": 20, "epochs": 1, "batch_size": 20,
                 "distance": 20.0, "lr": 1e-2, "glow_steps": 2, "glow_hidden": 16, "device": "cpu"})
    for _ in range(3):  # 30 steps; the flow separates z_0 slowly (~50 of ~5000 nats per image)
        exp.train_epoch()
    with torch.no_grad():
        z, _ = exp.model(glow.dequantize(exp.train_x))
    m0, m1 = float(z[exp.comp == 0, 0].mean()), float(z[exp.comp == 1, 0].mean())
    assert m0 < -1 and m1 > 1, (m0, m1)  # from ~0 towards label 1 -> −10, label 7 -> +10
    exp.write_artifacts(tmp_path)
    assert (tmp_path / "nll_by_component.png").stat().st_size > 1000 and (tmp_path / "latent_axis0.png").exists()


def test_glow_checkpoint_resume_is_exact(tmp_path):
    cfg = mixture.Config(model="glow", train_n=60, test_n=10, epochs=2, batch_size=20, glow_steps=2, glow_hidden=8,
                         device="cpu")
    assert_resumes_exactly(lambda: mixture.Experiment(cfg), tmp_path)


@pytest.mark.parametrize("bad,match", [
    (dict(glow_steps=0), "glow_steps"), (dict(glow_hidden=0), "glow_hidden"), (dict(glow_squeezes=0), "glow_squeezes"),
    (dict(glow_squeezes=5), "glow_squeezes"), (dict(model="realnvp"), "model"),
])
def test_glow_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        build_config({"method": "mixture", "model": "glow", **bad})


def test_glow_squeezes_must_divide_the_image_size():
    with pytest.raises(ConfigError, match="divisible"):  # 28 is not divisible by 8
        build({"method": "mixture", "model": "glow", "glow_squeezes": 3, "train_n": 10, "test_n": 10, "device": "cpu"})
    cfg = build_config({"method": "mixture", "model": "glow", "components": 60, "latent_dim": 50})
    assert cfg.components == 60  # Glow's latent is C·H·W = 784 dims: latent_dim does not bound K
