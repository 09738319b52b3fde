"""Every source of negatives, the EUBO and the adversarial scheme of paper 000, and the seed report."""

import csv
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_resumes_exactly

from oodlab import data
from oodlab.experiment import ConfigError
from oodlab.methods import negprior
from oodlab.methods.negprior import Config, Experiment
from oodlab.models.vae import VAE, VAEConfig
from oodlab.registry import build_config
from oodlab.report import PAPER_000, aggregate, bar_plot, paper_reference, to_csv, to_markdown
from oodlab.scores import iwae_log_likelihood
from oodlab.trials import group
from oodlab.vae_math import kl_to_normal


def _fmnist(n: int) -> torch.Tensor:
    return data.to_float(data.load("fashion_mnist", "test").x[:n])


def _changed(before: list[torch.Tensor], params) -> bool:
    return any(not torch.equal(b, p.detach()) for b, p in zip(before, params))


# ---------------------------------------------------------------- sources: sign and target

@pytest.mark.parametrize("source", ["aux", "gaussian_noise", "uniform_noise", "random", "inlier_noise"])
def test_every_source_moves_negatives_toward_shift_not_inliers(source):
    """A sign or target mistake in the negative term (or negatives drawn wrongly) shows here.

    30 steps on a fixed batch of 32 inliers (negatives drawn fresh each step, as in
    training): negatives' posterior means head for shift·1 = 4 and end well above the
    inliers'. (Early on the shared encoder drags inliers up a little too; the existing
    aux test in test_negprior.py checks inliers near 0 after a longer run.)
    """
    exp = Experiment(Config(negatives=source, shift=4.0, train_n=32, test_n=100, lr=1e-3, device="cpu"))
    x = data.to_float(exp.train_x)
    for _ in range(30):
        parts = negprior.loss(exp.model, x, exp.negatives_batch(x), 4.0, 1.0)
        exp.opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        exp.opt.step()
    exp.model.eval()
    x_in = data.to_float(exp.test["id"].x)
    with torch.no_grad():
        mu_in, _ = exp.model.encode(x_in)
        mu_neg, _ = exp.model.encode(exp.negatives_batch(x_in))
    neg, inl = mu_neg.mean().item(), mu_in.mean().item()
    assert neg > 1.8, f"{source}: negatives' posterior means should head to shift·1 = 4, got {neg:.2f}"
    assert neg > inl + 0.3, f"{source}: negatives ({neg:.2f}) should end above the inliers ({inl:.2f})"


def test_negatives_are_drawn_from_the_configured_source():
    x = _fmnist(50)
    draws = {}
    for source in ("aux", "gaussian_noise", "uniform_noise", "random", "inlier_noise"):
        exp = Experiment(Config(negatives=source, train_n=50, test_n=10, device="cpu"))
        draws[source] = exp.negatives_batch(x)
        assert draws[source].shape == x.shape and 0 <= draws[source].min() and draws[source].max() <= 1
    dark = x == 0  # there clip(0 + N(0, σ²), 0, 1) has mean E[max(N, 0)] = σ/√(2π)
    assert abs(draws["inlier_noise"][dark].mean().item() - 0.25 / math.sqrt(2 * math.pi)) < 0.01
    assert abs(draws["random"].mean().item() - 0.5) < 0.02 and abs(draws["random"].std().item() - 12 ** -0.5) < 0.02
    assert abs(draws["gaussian_noise"].mean().item() - 0.5) < 0.02  # data's N(0.5, 0.25²) set
    aux = data.to_float(data.load("notmnist", "test").x)
    assert all((aux == d).flatten(1).all(1).any() for d in draws["aux"][:5])  # each draw is a notMNIST image
    assert Experiment(Config(negatives="none", train_n=50, test_n=10, device="cpu")).negatives_batch(x) is None


@pytest.mark.parametrize("source,figures", [("random", {"samples.png", "negatives.png"}),
                                            ("none", {"samples.png"}), ("adversarial", {"samples.png"})])
def test_trial_figures_show_samples_and_the_drawn_negatives(tmp_path, source, figures):
    """What a trial's MLflow run gets from the method (the runner logs the folder as it is)."""
    Experiment(Config(negatives=source, train_n=50, test_n=10, device="cpu")).write_artifacts(tmp_path)
    assert {f.name for f in tmp_path.iterdir()} == figures


# ---------------------------------------------------------------- EUBO

def test_eubo_is_the_self_normalised_upper_bound():
    """Σ softmax(log w)·log w on the same samples: ≥ IWAE bound ≥ mean log w, ≤ max log w; equals a float64 recompute.
    """
    torch.manual_seed(0)
    m = VAE(VAEConfig())
    x, k = _fmnist(6), 5
    with torch.no_grad():
        e = negprior.eubo(m, x, k, torch.Generator().manual_seed(3))
        iw = iwae_log_likelihood(m, x, k, torch.Generator().manual_seed(3))
        mu, logvar = m.encode(x)  # independent recompute of log w with torch.distributions
        eps = torch.randn(mu.repeat_interleave(k, 0).shape, generator=torch.Generator().manual_seed(3))
        z = mu.repeat_interleave(k, 0) + eps * (0.5 * logvar.repeat_interleave(k, 0)).exp()
        q = torch.distributions.Normal(mu.repeat_interleave(k, 0), (0.5 * logvar.repeat_interleave(k, 0)).exp())
        log_px = (
            -F.binary_cross_entropy_with_logits(m.decode(z), x.repeat_interleave(k, 0), reduction="none")
            .flatten(1)
            .sum(1)
        )
        log_w = (
            (log_px + torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1) - q.log_prob(z).sum(1))
            .view(-1, k)
            .double()
        )
    ref = ((log_w - log_w.max(1, keepdim=True).values).exp() * log_w).sum(1) / (
        log_w - log_w.max(1, keepdim=True).values
    ).exp().sum(1)
    torch.testing.assert_close(e.double(), ref, rtol=1e-4, atol=1e-2)
    assert torch.all(e >= iw - 1e-3) and torch.all(iw >= log_w.mean(1).float() - 1e-3)
    assert torch.all(e <= log_w.max(1).values.float() + 1e-3)
    assert torch.all(log_w < -100) and torch.all(
        log_w.float().exp() == 0
    )  # in float32 the naive E[w log w] / E[w] would be 0/0


def test_eubo_training_is_finite_and_lowers_the_negatives_bound():
    cfg = Config(negatives="aux", eubo=True, eubo_k=4, train_n=600, test_n=100, epochs=1, lr=1e-3, device="cpu")
    exp = Experiment(cfg)
    x_neg = data.to_float(exp.aux_x[:200])
    measure = lambda: negprior.eubo(exp.model, x_neg, 4, torch.Generator().manual_seed(0)).mean().item()
    with torch.no_grad():
        before = measure()
    parts = [exp.train_epoch() for _ in range(2)]
    with torch.no_grad():
        after = measure()
    assert (
        all(math.isfinite(v) for p in parts for v in p.values()) and "neg_eubo" in parts[0] and "neg_kl" not in parts[0]
    )
    assert after < before - 50, f"EUBO of negatives should fall: {before:.1f} -> {after:.1f} nats"
    assert parts[1]["nelbo"] < parts[0]["nelbo"], "inliers' −ELBO should still fall"


# ---------------------------------------------------------------- adversarial

def _adv_setup(seed: int = 0):
    torch.manual_seed(seed)
    cfg = Config(negatives="adversarial", shift=4.0, lr=1e-3, device="cpu")
    m = VAE(VAEConfig())
    opt_e = torch.optim.RMSprop(m.encoder_parameters(), lr=cfg.lr)
    opt_d = torch.optim.RMSprop(m.decoder_parameters(), lr=cfg.lr)
    return cfg, m, opt_e, opt_d


def test_adversarial_steps_update_encoder_and_decoder_in_alternation():
    cfg, m, opt_e, opt_d = _adv_setup()
    x, z = _fmnist(20), torch.randn(20, 10)
    enc0, dec0 = (
        [p.detach().clone() for p in m.encoder_parameters()],
        [p.detach().clone() for p in m.decoder_parameters()],
    )
    negprior.encoder_step(m, opt_e, x, z, cfg)
    assert _changed(enc0, m.encoder_parameters()) and not _changed(dec0, m.decoder_parameters())
    enc1 = [p.detach().clone() for p in m.encoder_parameters()]
    negprior.decoder_step(m, opt_d, x, z, cfg)
    assert _changed(dec0, m.decoder_parameters()) and not _changed(enc1, m.encoder_parameters())
    assert all(p.grad is None for p in m.parameters())


def test_adversarial_directions_encoder_pushes_samples_out_decoder_pulls_them_in():
    """Encoder steps send generated samples' posteriors toward shift·1; decoder steps lower KL(q(z|x̂) || p(z))."""
    cfg, m, opt_e, opt_d = _adv_setup()
    x, z = _fmnist(50), torch.randn(50, 10)
    for _ in range(25):
        negprior.encoder_step(m, opt_e, x, z, cfg)
    with torch.no_grad():
        mu_gen, lv_gen = m.encode(negprior.generate(m, z))
        mu_in, _ = m.encode(x)
        adv_before = kl_to_normal(mu_gen, lv_gen).mean().item()
    assert mu_gen.mean() > 2.0 and abs(mu_in.mean()) < 0.5 * mu_gen.mean(), (mu_gen.mean(), mu_in.mean())
    for _ in range(25):
        negprior.decoder_step(m, opt_d, x, z, cfg)
    with torch.no_grad():
        adv_after = kl_to_normal(*m.encode(negprior.generate(m, z))).mean().item()
    assert adv_after < 0.8 * adv_before, f"decoder should pull samples under p(z): {adv_before:.1f} -> {adv_after:.1f}"


def test_adversarial_trial_resumes_exactly_with_both_optimizers(tmp_path):
    cfg = Config(negatives="adversarial", train_n=200, test_n=50, epochs=2, device="cpu")
    b, _ = assert_resumes_exactly(lambda: Experiment(cfg), tmp_path)
    assert {"opt", "opt_dec"} <= set(b.state_dict())


def test_color_arch_gaussian_adversarial_with_spectral_norm_on_stand_ins(tmp_path):
    """32×32×3 stand-ins (gray sets in color), DCGAN-style VAE, Gaussian decoder, spectral-normed encoder."""
    c3 = "[channels=3,size=32]"
    cfg = dict(id="fashion_mnist[n=400,channels=3,size=32]", ood="mnist" + c3, negatives="adversarial",  # n: resize 400
               decoder="gaussian", spectral_norm=True, shift=25.0, optimizer="adam", train_n=100, val_n=100, test_n=30,
               epochs=1, device="cpu")
    exp = Experiment(build_config(cfg))
    res = exp.step()
    assert all(0 <= res.metrics[f"auroc_mnist_channels_3_size_32_{s}"] <= 1 for s in ("bpd", "kl"))
    assert all(math.isfinite(v) for v in res.train.values())
    assert exp.model.cfg.arch == "color" and any(hasattr(m, "parametrizations") for m in exp.model.encoder.modules())
    exp.write_artifacts(tmp_path)
    assert (tmp_path / "samples.png").is_file()


@pytest.mark.parametrize("bad,match", [
    (dict(negatives="gaussian_noise", ood="mnist,gaussian_noise"), "leak"),
    (dict(negatives="random", ood="uniform_noise"), "leak"),
    (dict(negatives="bogus"), "negatives"), (dict(eubo_k=0), "eubo_k"), (dict(noise_sigma=0.0), "noise_sigma"),
    (dict(adv_weight=-1.0), "adv_weight"),
])
def test_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        build_config(bad)


# ---------------------------------------------------------------- report

def _trial(neg, dec, seed, bpd, kl):
    return ({"id": "fashion_mnist", "ood": "mnist", "negatives": neg, "decoder": dec, "seed": str(seed), "lr": "0.001"},
            {"auroc_mnist_bpd": bpd, "auroc_mnist_kl": kl, "loss": 1.0})


def test_report_groups_seeds_with_mean_sd_and_paper_numbers(tmp_path):
    trials = [_trial("none", "bernoulli", 0, 0.40, 0.6), _trial("none", "bernoulli", 1, 0.50, 0.7),
              _trial("aux", "bernoulli", 0, 0.97, 0.99), _trial("aux", "bernoulli", 1, 0.99, 1.0)]
    cells = {(c.negatives, c.score): c for c in aggregate(group(trials))}
    assert len(cells) == 4
    c = cells[("none", "bpd")]
    assert (
        c.values == [0.40, 0.50] and c.mean == pytest.approx(0.45) and c.sd == pytest.approx(np.std([0.4, 0.5], ddof=1))
    )
    assert c.paper == PAPER_000[("fashion_mnist", "mnist", "bernoulli", "none", "bpd")] == (0.46, 0.05)
    md = to_markdown(list(cells.values()), "s")
    assert "| fashion_mnist | mnist | bernoulli | 0.45 (0.07) [0.46 (0.05)] | 0.98 (0.01) [1.00 (0.00)] |" in md
    assert "mean (sd) over 2 seed(s)" in md
    assert "## AUC BPD" in md and "## AUC KL" in md and "emnist_letters" in md
    rows = list(csv.DictReader(io.StringIO(to_csv(list(cells.values())))))
    r = next(r for r in rows if r["negatives"] == "aux" and r["score"] == "kl")
    assert float(r["mean"]) == pytest.approx(0.995) and r["n"] == "2" and float(r["paper_mean"]) == 1.0
    bar_plot(list(cells.values()), tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert paper_reference("fashion_mnist", "mnist")["bernoulli/adversarial/kl"] == 0.88

