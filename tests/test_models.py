"""VAE shapes, likelihoods, KL terms and scores against torch.distributions."""

import math

import pytest
import torch
from torch import distributions as D

from oodlab.models.vae import VAE, VAEConfig
from oodlab.scores import elbo_terms, iwae_log_likelihood, score_batch
from oodlab.vae_math import kl_to_normal, log_normal, to_bpd


@pytest.mark.parametrize("arch,c,s", [("gray", 1, 28), ("gray", 1, 32), ("color", 3, 32)])
@pytest.mark.parametrize("decoder", ["bernoulli", "gaussian"])
def test_shapes(arch, c, s, decoder):
    m = VAE(VAEConfig(arch=arch, decoder=decoder, channels=c, size=s, latent_dim=7))
    x = torch.rand(5, c, s, s)
    mu, logvar = m.encode(x)
    assert mu.shape == logvar.shape == (5, 7)
    assert m.decode(mu).shape == (5, c, s, s)
    t = elbo_terms(m, x)
    assert all(t[k].shape == (5,) for k in ("rec", "kl", "elbo"))
    scores = score_batch(m, x, iwae_k=3)
    assert set(scores) == {"bpd", "kl", "iwae"} and all(v.shape == (5,) for v in scores.values())


def test_bad_model_config():
    with pytest.raises(ValueError, match="32×32"):
        VAEConfig(arch="color", size=28)
    with pytest.raises(ValueError, match="decoder"):
        VAEConfig(decoder="laplace")


def test_kl_matches_torch():
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6)
    q = D.Independent(D.Normal(mu, (0.5 * logvar).exp()), 1)
    for shift in (0.0, 8.0):
        p = D.Independent(D.Normal(torch.full_like(mu, shift), torch.ones_like(mu)), 1)
        torch.testing.assert_close(kl_to_normal(mu, logvar, shift), D.kl_divergence(q, p))
    z = torch.randn(4, 6)
    torch.testing.assert_close(log_normal(z, mu, logvar), q.log_prob(z))


def test_likelihoods_match_torch():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 28, 28)
    logits = torch.randn(3, 1, 28, 28)
    bern = VAE(VAEConfig(decoder="bernoulli"))
    bce = (
        -(x * torch.nn.functional.logsigmoid(logits) + (1 - x) * torch.nn.functional.logsigmoid(-logits))
        .flatten(1)
        .sum(1)
    )
    torch.testing.assert_close(bern.log_px(x, logits), -bce)
    gauss = VAE(VAEConfig(decoder="gaussian"))
    with torch.no_grad():
        gauss.log_sigma.fill_(math.log(0.3))
    ref = D.Normal(torch.sigmoid(logits), 0.3).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gauss.log_px(x, logits), ref)


def test_bpd_definition_and_sign():
    ll = torch.tensor([-784 * math.log(2.0), -2 * 784 * math.log(2.0)])
    torch.testing.assert_close(to_bpd(ll, 784), torch.tensor([1.0, 2.0]))  # lower likelihood -> higher score


def test_iwae_tightens_elbo():
    torch.manual_seed(0)
    m = VAE(VAEConfig())
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        elbo = torch.stack([elbo_terms(m, x)["elbo"] for _ in range(50)]).mean(0)
        iwae = iwae_log_likelihood(m, x, k=64)
    assert iwae.mean() > elbo.mean()  # a tighter lower bound, on average over MC noise
    assert (iwae - elbo).abs().max() < 5.0  # and the same quantity
