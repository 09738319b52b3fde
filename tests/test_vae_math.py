"""oodlab.vae_math against torch.distributions and closed forms: the one home of each formula."""

import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from oodlab import vae_math as vm


def _stats(b: int = 5, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, d, generator=g, dtype=torch.float64)


def _q(mu: torch.Tensor, logvar: torch.Tensor) -> Independent:
    return Independent(Normal(mu, (0.5 * logvar).exp()), 1)


@pytest.mark.parametrize("mean", [0.0, 8.0, "tensor"])
def test_kl_to_normal_matches_torch_distributions(mean):
    mu, logvar = _stats()
    m = torch.linspace(-3, 3, mu.shape[1], dtype=torch.float64).expand_as(mu) if mean == "tensor" else mean
    prior = Independent(Normal(torch.as_tensor(m, dtype=torch.float64).expand_as(mu), torch.ones_like(mu)), 1)
    torch.testing.assert_close(vm.kl_to_normal(mu, logvar, m), kl_divergence(_q(mu, logvar), prior))
    assert (vm.kl_to_normal(mu, logvar, m) > 0).all()
    assert vm.kl_to_normal(torch.zeros(2, 3), torch.zeros(2, 3)).abs().max() == 0  # q = p


def test_log_densities_match_torch_distributions():
    mu, logvar = _stats()
    z, _ = _stats(seed=1)
    torch.testing.assert_close(vm.log_normal(z, mu, logvar), _q(mu, logvar).log_prob(z))
    std = Independent(Normal(torch.zeros_like(z), torch.ones_like(z)), 1)
    torch.testing.assert_close(vm.log_std_normal(z), std.log_prob(z))


def test_reparameterize_uses_the_given_noise_or_the_generator():
    mu, logvar = _stats()
    eps, _ = _stats(seed=2)
    torch.testing.assert_close(vm.reparameterize(mu, logvar, eps=eps), mu + eps * logvar.exp().sqrt())
    a = vm.reparameterize(mu, logvar, torch.Generator().manual_seed(3))
    b = vm.reparameterize(mu, logvar, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, mu)
    # many draws of one posterior: sample mean and variance near μ and σ²
    m, lv = torch.tensor([[1.5, -2.0]]), torch.tensor([[0.0, math.log(4.0)]])
    z = vm.reparameterize(m.expand(200_000, 2), lv.expand(200_000, 2), torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.mean(0), m[0], atol=0.02, rtol=0)
    torch.testing.assert_close(z.var(0), lv[0].exp(), atol=0.05, rtol=0)


def test_sample_k_folds_k_draws_per_row_in_order():
    mu, logvar = _stats(b=3, d=2)
    z, mu_k, logvar_k = vm.sample_k(mu, logvar, 4, torch.Generator().manual_seed(0))
    assert z.shape == (12, 2)
    assert torch.equal(mu_k.view(3, 4, 2)[:, 0], mu) and torch.equal(mu_k.view(3, 4, 2)[:, 3], mu)
    assert torch.equal(logvar_k.view(3, 4, 2)[:, 1], logvar)


def test_iwae_log_weights_and_log_mean_exp():
    mu, logvar = _stats(b=6, d=3)
    z, _ = _stats(b=6, d=3, seed=4)
    log_px = torch.linspace(-5, -1, 6, dtype=torch.float64)
    std = Independent(Normal(torch.zeros_like(z), torch.ones_like(z)), 1)
    want = log_px + std.log_prob(z) - _q(mu, logvar).log_prob(z)
    torch.testing.assert_close(vm.iwae_log_weights(log_px, z, mu, logvar), want)
    other = torch.full((6,), -7.0, dtype=torch.float64)  # another prior's log-density
    torch.testing.assert_close(vm.iwae_log_weights(log_px, z, mu, logvar, log_pz=other),
                               log_px + other - _q(mu, logvar).log_prob(z))
    w = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), math.log(2.0)]], dtype=torch.float64)
    torch.testing.assert_close(vm.log_mean_exp(w, dim=1), torch.log(torch.tensor([2.0, 2.0], dtype=torch.float64)))


def test_bits_per_dim_and_to_bpd():
    nats = torch.tensor([784 * math.log(2.0)])
    torch.testing.assert_close(vm.bits_per_dim(nats, 784), torch.tensor([1.0]))
    torch.testing.assert_close(vm.to_bpd(-nats, 784), torch.tensor([1.0]))  # −log p in bits per pixel


def test_gaussian_stats_splits_and_clamps():
    h = torch.tensor([[1.0, 2.0, -100.0, 100.0]])
    mu, logvar = vm.gaussian_stats(h)
    assert torch.equal(mu, torch.tensor([[1.0, 2.0]]))
    assert torch.equal(logvar, torch.tensor([[vm.LOGVAR_MIN, vm.LOGVAR_MAX]]))
    assert torch.isfinite(vm.kl_to_normal(mu, logvar)).all()
