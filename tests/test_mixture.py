"""Mixture priors (papers 001/003): exact densities, assignment, the categorical VAE, the trial and its figures
(its study runs through the shared runner, tested end to end by tests/test_readme.py)."""

import math

import numpy as np
import pytest
import scipy.stats as st
import torch
from conftest import assert_reports_validation_and_test_metrics, assert_resumes_exactly
from scipy import integrate

from oodlab.experiment import ConfigError, load_sets
from oodlab.methods import mixture
from oodlab.methods.mixture import Config, Experiment
from oodlab.mixture_priors import MixturePrior, component_means, gen_gaussian_alpha, log_density_1d
from oodlab.models.mixture_vae import CatVAE, CatVAEConfig
from oodlab.registry import build_config
from oodlab.vae_math import log_normal

# ---------------------------------------------------------------- priors

def test_component_means_follow_the_paper():
    m2 = component_means(2, 150.0, 5)
    assert m2.tolist() == [[-75.0, 0, 0, 0, 0], [75.0, 0, 0, 0, 0]]
    m4 = component_means(4, 150.0, 6)
    torch.testing.assert_close(m4, torch.cat([150.0 * torch.eye(4), torch.zeros(4, 2)], 1).double())
    assert component_means(1, 99.0, 3).abs().sum() == 0
    with pytest.raises(ValueError, match="latent_dim"):
        component_means(5, 1.0, 3)
    # the quad-modal Glow (paper 003 §5.4): [200·i, 0, …], i = 0..3, all on the first axis
    line = component_means(4, 200.0, 6, "line")
    assert line[:, 0].tolist() == [0.0, 200.0, 400.0, 600.0] and line[:, 1:].abs().sum() == 0
    assert build_config({"method": "mixture", "model": "glow", "components": 4}).mean_layout == "line"
    assert build_config({"method": "mixture", "components": 4}).mean_layout == "axes"  # the VAE's 150·e_i


@pytest.mark.parametrize("beta", [1.0, 2.0, 4.0, 8.0])
def test_gen_gaussian_matches_scipy_and_has_unit_variance(beta):
    x = np.linspace(-6, 6, 101)
    alpha = gen_gaussian_alpha(beta)
    ours = log_density_1d(torch.tensor(x, dtype=torch.float64), "gen_gaussian", beta).numpy()
    np.testing.assert_allclose(ours, st.gennorm.logpdf(x, beta, scale=alpha), rtol=1e-10, atol=1e-10)
    assert st.gennorm.var(beta, scale=alpha) == pytest.approx(1.0)  # α chosen for unit variance (§4)
    mass = integrate.quad(lambda t: math.exp(log_density_1d(torch.tensor(t), "gen_gaussian", beta)), -np.inf, np.inf)[0]
    assert mass == pytest.approx(1.0, abs=1e-7)


def test_beta2_gen_gaussian_is_standard_normal():
    x = torch.linspace(-5, 5, 41, dtype=torch.float64)
    torch.testing.assert_close(log_density_1d(x, "gen_gaussian", 2.0), log_density_1d(x, "gaussian"))
    torch.testing.assert_close(log_density_1d(x, "gaussian"), torch.distributions.Normal(0.0, 1.0).log_prob(x))


def test_gaussian_mixture_matches_torch_distributions():
    dim, k = 4, 3
    prior = MixturePrior.build("gaussian", k, 2.5, dim)
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.ones(k)),
        torch.distributions.Independent(torch.distributions.Normal(prior.means, torch.ones(k, dim)), 1))
    z = torch.randn(7, 5, dim) * 3  # arbitrary batch shape
    torch.testing.assert_close(prior.log_prob(z), ref.log_prob(z), rtol=1e-5, atol=1e-5)
    two = MixturePrior.build("gaussian", 2, 150.0, dim)
    far = torch.tensor([[75.0, 0, 0, 0], [-75.0, 1.0, 0, 0], [0.0, 0, 0, 0]])
    expect = np.logaddexp(st.multivariate_normal.logpdf(far.numpy(), [75, 0, 0, 0]),
                          st.multivariate_normal.logpdf(far.numpy(), [-75, 0, 0, 0])) - math.log(2)
    torch.testing.assert_close(two.log_prob(far), torch.tensor(expect).float(), rtol=1e-5, atol=1e-3)  # no underflow


def test_gen_gaussian_mixture_matches_scipy_and_integrates_to_one():
    prior = MixturePrior.build("gen_gaussian", 2, 3.0, 2, beta=4.0)
    z = torch.randn(50, 2, dtype=torch.float64) * 2
    alpha = gen_gaussian_alpha(4.0)
    comp = [st.gennorm.logpdf(z.numpy() - m.numpy(), 4.0, scale=alpha).sum(1) for m in prior.means.double()]
    expect = np.logaddexp(*comp) - math.log(2)
    np.testing.assert_allclose(prior.to("cpu").log_prob(z.float()).numpy(), expect, rtol=1e-5, atol=1e-5)
    # Numerical normalisation of the 2-D mixture density on a grid.
    g = torch.linspace(-8, 8, 801)
    zz = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1)
    mass = prior.log_prob(zz).exp().sum() * (g[1] - g[0]) ** 2
    assert float(mass) == pytest.approx(1.0, abs=1e-4)


def test_assigned_component_density_and_kl():
    torch.manual_seed(0)
    prior = MixturePrior.build("gaussian", 2, 10.0, 3)
    mu, logvar = torch.randn(6, 3), torch.randn(6, 3) * 0.3
    comp = torch.tensor([0, 1, 0, 1, 1, 0])
    q = torch.distributions.Independent(torch.distributions.Normal(mu, (0.5 * logvar).exp()), 1)
    p = torch.distributions.Independent(torch.distributions.Normal(prior.means[comp], torch.ones(6, 3)), 1)
    torch.testing.assert_close(prior.kl_assigned(mu, logvar, mu, comp), torch.distributions.kl_divergence(q, p))
    z = torch.randn(6, 3)
    torch.testing.assert_close(prior.log_prob_assigned(z, comp), p.log_prob(z))
    # Generalized Gaussian: the one-sample estimate is log q − log p_c at z, and is unbiased.
    gg = MixturePrior.build("gen_gaussian", 2, 10.0, 3, beta=4.0)
    torch.testing.assert_close(
        gg.kl_assigned(mu, logvar, z, comp), log_normal(z, mu, logvar) - gg.log_prob_assigned(z, comp)
    )
    zs = mu + torch.randn(200_000, 6, 3) * (0.5 * logvar).exp()
    mc = (log_normal(zs, mu, logvar) - gg.log_prob_assigned(zs, comp.expand(200_000, 6))).mean(0)
    gauss_kl = torch.distributions.kl_divergence(q, p)
    assert torch.all(mc > 0) and not torch.allclose(mc, gauss_kl, rtol=0.05)  # a different family, a different KL


def test_samples_have_the_right_moments():
    for family in ("gaussian", "gen_gaussian"):
        prior = MixturePrior.build(family, 2, 6.0, 2, beta=4.0)
        s = prior.sample(100_000, torch.Generator().manual_seed(0))
        assert abs(float(s[:, 0].abs().mean()) - 3.0) < 0.05  # half at -3, half at +3
        resid = s[:, 0] - 3.0 * s[:, 0].sign()
        assert float(resid.var()) == pytest.approx(1.0, abs=0.03)
        kurt = float(resid.pow(4).mean() / resid.var() ** 2)
        assert kurt == pytest.approx(3.0 if family == "gaussian" else st.gennorm.stats(4.0, moments="k") + 3, abs=0.1)


# ---------------------------------------------------------------- assignment, model, importance sampling

def test_assignments():
    y = torch.tensor([7, 1, 1, 7, 7])
    assert mixture.assign_by_labels(y, 2).tolist() == [1, 0, 0, 1, 1]
    with pytest.raises(ConfigError, match="classes"):
        mixture.assign_by_labels(y, 3)
    x = torch.zeros(40, 1, 4, 4, dtype=torch.uint8)
    x[20:] = 255  # two obvious clusters
    c = mixture.assign_by_kmeans(x, 2, seed=0)
    assert len(set(c[:20].tolist())) == 1 and len(set(c[20:].tolist())) == 1 and c[0] != c[-1]


@pytest.mark.parametrize("arch,c,s", [("gray", 1, 28), ("color", 3, 32)])
def test_cat_vae_shapes_and_categorical_likelihood(arch, c, s):
    torch.manual_seed(0)
    m = CatVAE(CatVAEConfig(arch=arch, channels=c, size=s, latent_dim=8)).eval()
    x = torch.randint(0, 256, (3, c, s, s)).float() / 255
    mu, logvar = m.encode(x)
    logits = m.decode(mu)
    assert mu.shape == (3, 8) and logits.shape == (3, 256, c, s, s)
    ref = (
        torch.distributions.Categorical(logits=logits.movedim(1, -1))
        .log_prob((x * 255).round().long())
        .flatten(1)
        .sum(1)
    )
    torch.testing.assert_close(m.log_px(x, logits), ref)


def test_importance_sampling_matches_a_per_image_loop():
    """log p(x) ≈ logsumexp_k [log p(x|z_k) + log p_mix(z_k) − log q(z_k|x)] − log k, same draws."""
    torch.manual_seed(0)
    m = CatVAE(CatVAEConfig(latent_dim=4)).eval()
    prior = MixturePrior.build("gaussian", 2, 8.0, 4)
    x = torch.rand(3, 1, 28, 28)
    ll = mixture.is_log_likelihood(m, prior, x, k=16, generator=torch.Generator().manual_seed(1), max_rows=16)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        mu, logvar = m.encode(x)
        manual = []
        for i in range(3):
            z = mu[i] + torch.randn(16, 4, generator=gen) * (0.5 * logvar[i]).exp()
            comps = torch.stack([torch.distributions.Normal(mean, 1.0).log_prob(z).sum(-1) for mean in prior.means])
            log_p = torch.logsumexp(comps, 0) - math.log(2)
            lw = m.log_px(x[i : i + 1].expand(16, -1, -1, -1), m.decode(z)) + log_p - log_normal(z, mu[i], logvar[i])
            manual.append(torch.logsumexp(lw, 0) - math.log(16))
    torch.testing.assert_close(ll, torch.stack(manual), rtol=1e-5, atol=1e-2)


# ---------------------------------------------------------------- the method

def test_trial_reports_nll_auroc_and_gap(tmp_path):
    cfg = Config(train_n=40, test_n=20, epochs=1, batch_size=20, is_samples=2, device="cpu")
    exp = Experiment(cfg)
    train, _ = load_sets(cfg, torch.device("cpu"))  # the same training images, in the same order
    assert set(train.y.tolist()) == {1, 7}  # Trouser and Sneaker
    assert torch.equal(exp.comp, (train.y == 7).long())  # component = rank of the label
    res = exp.step()
    s_id, s_out = res.scores["id"]["nll"], res.scores["mnist"]["nll"]
    assert s_id.shape == (20,) and np.all(np.isfinite(s_out))
    from sklearn.metrics import roc_auc_score

    assert res.metrics["auroc_mnist_nll"] == pytest.approx(roc_auc_score([0] * 20 + [1] * 20, np.r_[s_id, s_out]))
    assert res.metrics["nll_gap_mnist"] == pytest.approx(s_out.mean() - s_id.mean(), rel=1e-6)
    assert_reports_validation_and_test_metrics(cfg, res)
    exp.write_artifacts(tmp_path)
    assert (tmp_path / "nll_by_component.png").stat().st_size > 1000 and (tmp_path / "latent_axis0.png").exists()


def test_bimodal_training_pulls_latents_to_their_components():
    """Two epochs (20 steps) move each class's posterior means from ~0 towards its own mean ±10
    (measured: -5.0 and +10.5 with one torch thread)."""
    cfg = Config(train_n=100, test_n=10, epochs=2, batch_size=10, distance=20.0, lr=1e-2, is_samples=1, device="cpu")
    exp = Experiment(cfg)
    exp.train_epoch()
    exp.train_epoch()
    exp.model.eval()
    with torch.no_grad():
        mu, _ = exp.model.encode(exp.train_x.float() / 255)
    m0, m1 = float(mu[exp.comp == 0, 0].mean()), float(mu[exp.comp == 1, 0].mean())
    assert m0 < -3 and m1 > 3, (m0, m1)  # label 1 -> component 0 at −10, label 7 -> component 1 at +10


def test_checkpoint_resume_is_exact(tmp_path):
    cfg = Config(train_n=20, test_n=10, batch_size=10, epochs=2, is_samples=1, device="cpu")
    assert_resumes_exactly(lambda: Experiment(cfg), tmp_path)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(family="cauchy"), "family"),
        (dict(assignment="gmm"), "assignment"),
        (dict(components=0), "components"),
        (dict(components=60, latent_dim=50), "latent_dim"),
        (dict(is_samples=0), "is_samples"),
        (dict(model="pixelcnn"), "model"),
        (dict(layout="ring"), "layout"),
    ],
)
def test_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        build_config({"method": "mixture", **bad})
