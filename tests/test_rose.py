"""ROSE (paper 004) and its baselines: every quantity against an independent, naive computation."""

import io
import math
import runpy

import numpy as np
import pytest
import torch
from conftest import REPO, assert_reports_validation_and_test_metrics
from PIL import Image

from oodlab import data
from oodlab.experiment import ConfigError
from oodlab.methods import likelihood_baselines as lb
from oodlab.methods import rose
from oodlab.models.rose_vae import RoseVAE, RoseVAEConfig, elbo
from oodlab.registry import build_config, run_trial


def _per_sample_grads(model: RoseVAE, x: torch.Tensor, eps: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample −ELBO gradients of the encoder conv weights, each (B, C_out, C_in·k·k)."""
    return [rose.grads_from_terms(p, d) for p, d in rose.layer_terms(model, x, eps)]


def _ekfac_dense(u_a: torch.Tensor, u_b: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The dense EKFAC Fisher (U_A ⊗ U_B) diag(Σ) (U_A ⊗ U_B)ᵀ in row-major vec(G) order."""
    u = torch.kron(u_b, u_a)  # vec(U_Bᵀ G U_A) = (U_B ⊗ U_A)ᵀ vec(G) for row-major vec
    return u @ torch.diag(sigma.flatten()) @ u.T


def _tiny(seed: int = 0, arch: str = "dcgan_bn") -> RoseVAE:
    """A small VAE in eval mode; BatchNorm's running statistics and γ, β are random so that BN matters."""
    torch.manual_seed(seed)
    m = RoseVAE(RoseVAEConfig(width=4, latent_dim=3, arch=arch, init="torch"))  # O(1) gradients for the math
    with torch.no_grad():
        for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.1)
    return m.eval()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _encoder_names(m: RoseVAE) -> list[str]:
    names = {id(p): k for k, p in m.named_parameters()}
    return [names[id(p)] for p in m.encoder_parameters()]


def _as_conv_weights(m: RoseVAE, weights: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``encoder_copies``-layout stacks back to stacked parameters {name: (B, *shape)} (conv weights un-im2col'd)."""
    params = dict(m.named_parameters())
    return {k: w.transpose(1, 2).reshape(len(w), *params[k].shape) if params[k].dim() == 4 else w
            for k, w in zip(_encoder_names(m), weights)}


def _naive_grads(model: RoseVAE, x_u8: torch.Tensor, eps: torch.Tensor) -> list[torch.Tensor]:
    """Per-image autograd, one image at a time: (N, C_out, Din [+1 bias]) per layer of ``model.convs``."""
    out = [[] for _ in model.convs]
    for j in range(len(x_u8)):
        model.zero_grad()
        (-elbo(model, data.to_float(x_u8[j : j + 1]), eps[j : j + 1])).sum().backward()
        for i, conv in enumerate(model.convs):
            g = conv.weight.grad.flatten(1)
            out[i].append(torch.cat([g, conv.bias.grad[:, None]], 1) if conv.bias is not None else g.clone())
    return [torch.stack(g) for g in out]


@pytest.mark.parametrize("arch", ["dcgan_bn", "plain"])
def test_per_sample_grads_and_diag_fisher_match_naive_loop(arch):
    m, x = _tiny(arch=arch), _images(6)
    eps = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    naive = _naive_grads(m, x, eps)
    assert len(naive) == (5 if arch == "dcgan_bn" else 4)  # 3 body convs + μ and log σ² heads (with bias) | fused head
    for g, n in zip(_per_sample_grads(m, data.to_float(x), eps), naive):
        torch.testing.assert_close(g, n, rtol=1e-4, atol=1e-6)
    fit = rose.fit_rose(m, x, eps, ("diag",), batch=4)["diag"]  # batches of 4 + 2: the weighting must be exact
    for f, n in zip(fit.fisher, naive):
        torch.testing.assert_close(f, n.pow(2).mean(0), rtol=1e-4, atol=1e-10)
    # layer scores, z-scores and ROSE (eq. 5, 10, 11) from the naive grads
    # the authors' damping: 1e-8, absolute
    s = torch.stack([(n.pow(2) / (f + 1e-8)).flatten(1).sum(1) for n, f in zip(naive, fit.fisher)], 1)
    torch.testing.assert_close(fit.mean, s.mean(0), rtol=1e-4, atol=0)
    torch.testing.assert_close(fit.std, s.std(0), rtol=1e-4, atol=0)
    r = rose.rose_scores(m, x, eps, {"diag": fit}, batch=4)["diag"]
    torch.testing.assert_close(r, ((s - s.mean(0)) / s.std(0)).clamp_min(0).amax(1), rtol=1e-4, atol=1e-5)
    assert (r >= 0).all() and r.max() > 0


def test_ekfac_is_exact_for_a_kronecker_fisher():
    """One sample, one location: F = vec(G) vec(G)ᵀ = (h hᵀ) ⊗ (δ δᵀ) exactly, and EKFAC recovers it."""
    g = torch.Generator().manual_seed(0)
    p, d = (
        torch.randn(1, 1, 5, generator=g, dtype=torch.float64),
        torch.randn(1, 1, 3, generator=g, dtype=torch.float64),
    )
    a, b = rose.kfac_factors(p, d)
    ua, ub = rose.eigenbasis(a), rose.eigenbasis(b)
    sigma = rose.diag_fisher(rose.projected_grads(p, d, ua, ub))
    vec = rose.grads_from_terms(p, d).flatten(1)  # (1, 15), row-major vec(G)
    torch.testing.assert_close(_ekfac_dense(ua, ub, sigma), vec.T @ vec)


def test_ekfac_beats_diag_on_a_correlated_kronecker_fisher():
    g = torch.Generator().manual_seed(0)
    n, din, dout = 20000, 4, 3
    la, lb_ = (
        torch.randn(din, din, generator=g, dtype=torch.float64),
        torch.randn(dout, dout, generator=g, dtype=torch.float64),
    )
    p = (torch.randn(n, 1, din, generator=g, dtype=torch.float64) @ la.T)  # correlated inputs
    d = (torch.randn(n, 1, dout, generator=g, dtype=torch.float64) @ lb_.T)  # independent, correlated output grads
    vec = rose.grads_from_terms(p, d).flatten(1)
    exact = vec.T @ vec / n
    a, b = rose.kfac_factors(p, d)
    ua, ub = rose.eigenbasis(a), rose.eigenbasis(b)
    ekfac = _ekfac_dense(ua, ub, rose.diag_fisher(rose.projected_grads(p, d, ua, ub)))
    diag = torch.diag(rose.diag_fisher(vec))
    err_e, err_d = (ekfac - exact).norm() / exact.norm(), (diag - exact).norm() / exact.norm()
    assert err_e < 0.05 and err_d > 0.3, (err_e, err_d)


def test_ekfac_scores_match_dense_inverse():
    """sᵀ F_EKFAC^{-1} s from the factored path equals the dense matrix inverse (no damping)."""
    m, x = _tiny(1), _images(8, 1)
    eps = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    fit = rose.fit_rose(m, x, eps, ("ekfac",), batch=8, damping=0.0)["ekfac"]
    terms = rose.layer_terms(m, data.to_float(x[:2]), eps[:2])
    p, d = terms[0]  # first conv: Din = 16, C_out = 4 -> a 64×64 Fisher
    (ua, ub), sig = fit.bases[0], fit.fisher[0]
    dense = _ekfac_dense(ua.double(), ub.double(), sig.double())
    g = rose.grads_from_terms(p, d).flatten(1).double()
    want = torch.einsum("bi,ij,bj->b", g, torch.linalg.pinv(dense, hermitian=True, rtol=1e-10), g)
    torch.testing.assert_close(fit.layer_scores(terms)[:, 0].double(), want, rtol=1e-3, atol=0)


def test_encoder_copy_gradients_are_each_images_own_with_batchnorm():
    """Stacked copies (conv weights, BN γ and β, head biases; BN in eval mode): the gradient of Σ_j −ELBO_j
    w.r.t. copy j is image j's own autograd gradient of the model, for every encoder parameter."""
    import copy

    m, x = _tiny(2), data.to_float(_images(3, 2))
    eps = torch.randn(3, 3, generator=torch.Generator().manual_seed(3))
    w = [t.requires_grad_(True) for t in m.encoder_copies(3)]
    mu, logvar = m.encode_copies(w, x)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
    grads = torch.autograd.grad((kl - m.log_px(x, m.decode(mu + eps * (0.5 * logvar).exp()))).sum(), w)
    names = _encoder_names(m)
    assert {"norms.0.weight", "norms.2.bias", "heads.0.bias", "heads.1.weight"} <= set(names)
    for j in range(3):
        mj = copy.deepcopy(m)
        (-elbo(mj, x[j : j + 1], eps[j : j + 1])).sum().backward()
        params = dict(mj.named_parameters())
        for k, g in zip(names, grads):
            ref = params[k].grad
            got = g[j].T.reshape(ref.shape) if ref.dim() == 4 else g[j]
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_likelihood_regret_batched_equals_loop():
    """Without BN (with BN, Adam's ±lr first steps on near-zero gradients amplify float noise; the test above
    checks the BN copies' gradients exactly)."""
    m, x = _tiny(2, "plain"), _images(3, 2)
    ref = [p.clone() for p in m.parameters()]
    g = torch.Generator().manual_seed(3)
    eps_train, eps_eval = torch.randn(3, 4, 3, generator=g), torch.randn(3, 4, 3, generator=g)
    xf = data.to_float(x)
    stacked = _as_conv_weights(m, lb.refit_encoders(m, xf, eps_train, lr=0.05))
    for j in range(3):  # every copy equals its own torch.optim.Adam run, and moved from the start
        mj = lb.refit_encoder_loop(m, xf[j : j + 1], eps_train[j : j + 1], lr=0.05)
        for k, p in mj.named_parameters():
            if k in stacked:
                # Adam's first steps are ~lr·sign(g): float noise on near-zero grads moves a few weights by ≪ lr
                torch.testing.assert_close(stacked[k][j], p, rtol=1e-3, atol=5e-4)
                assert (p - dict(m.named_parameters())[k]).abs().max() > 0.01
    batched = lb.likelihood_regret_batched(m, x, eps_train, eps_eval, lr=0.05, batch=2)  # batches of 2 + 1
    looped = lb.likelihood_regret_loop(m, x, eps_train, eps_eval, lr=0.05)
    torch.testing.assert_close(batched, looped, rtol=1e-3, atol=2e-6)
    for p, q in zip(m.parameters(), ref):
        torch.testing.assert_close(p, q)  # the scored model itself is untouched


def test_iwae_against_torch_distributions():
    m, x = _tiny(3), _images(4, 3)
    eps = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(4))
    xf = data.to_float(x)
    with torch.no_grad():
        mu, logvar = m.encode(xf)
        q = torch.distributions.Normal(mu[:, None], (0.5 * logvar).exp()[:, None])
        z = mu[:, None] + eps * (0.5 * logvar).exp()[:, None]  # (4, 2, 3)
        cat = torch.distributions.Categorical(logits=m.decode(z.flatten(0, 1)).movedim(1, -1))
        log_px = cat.log_prob((xf.repeat_interleave(2, 0) * 255).round().long()).flatten(1).sum(1).view(4, 2)
        log_w = log_px + torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
        want = torch.logsumexp(log_w, 1) - math.log(2)
        torch.testing.assert_close(lb.iwae_from_stats(m, xf, mu, logvar, eps), want, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(lb.iwae_bpd(m, x, eps, rows=4), -want / (1024 * math.log(2)), rtol=1e-5, atol=1e-6)
    many = lb.iwae_bpd(m, x, torch.randn(4, 64, 3, generator=torch.Generator().manual_seed(5)))
    assert 5 < many.mean() < 9  # 256-way categorical: an untrained model is near 8 bits/dim


def test_perturbations():
    x = _images(8, 4)
    g = torch.Generator().manual_seed(0)
    r = lb.perturb(x, "random:0.3", g)
    assert r.dtype == torch.uint8 and abs((r != x).float().mean().item() - 0.3 * 255 / 256) < 0.02
    sv = torch.linalg.svdvals(lb.perturb(x, "svd:28", g).float())  # top 4 of 32 kept; the rest is rounding noise
    assert (sv[..., 4:].amax(-1) < 0.01 * sv[..., 0]).all() and (sv[..., 3] > 0.02 * sv[..., 0]).all()
    c = lb.perturb(x, "dct:10", g).float()
    dm = lb._dct_matrix(32, "cpu")
    coeffs = (dm @ c @ dm.T).abs()
    assert ((coeffs > 3.0).flatten(1).sum(1) <= 10 + 20).all()  # K coefficients kept, the rest is rounding noise
    flat = torch.full((2, 1, 32, 32), 77, dtype=torch.uint8)
    assert torch.equal(lb.perturb(flat, "gb", g), flat) and lb.perturb(x, "gb", g).float().std() < x.float().std()
    for bad in ("blur", "svd", "random:2", "gb:3", "dct:2.5"):
        with pytest.raises(ValueError):
            lb.parse_perturbation(bad)


def test_input_complexity_code_lengths():
    x = torch.cat([torch.full((1, 1, 32, 32), 9, dtype=torch.uint8), _images(1, 5)])
    for codec, fmt in (("png", "PNG"), ("jp2", "JPEG2000")):
        bpd = lb.complexity_bpd(x, codec)
        assert bpd[0] < 0.3 * bpd[1] and bpd[1] > 7  # a flat image compresses, uniform noise does not
        buf = io.BytesIO()
        Image.fromarray(x[1, 0].numpy()).save(
            buf, format=fmt, **({"optimize": True, "compress_level": 9} if fmt == "PNG" else {})
        )
        assert bpd[1].item() == pytest.approx(8 * buf.tell() / 1024)


def test_rnd_learns_the_id_target():
    x = _images(32, 6) // 4  # dark images
    model = lb.train_rnd(x, "random:0.3", epochs=20, batch_size=32, seed=0)
    far = lb.rnd_score(model, 255 - x)
    assert lb.rnd_score(model, x).mean() < 0.5 * far.mean()


def test_brightness_and_overall_sets():
    m = data.load("mnist")
    dim = data.load("mnist[brightness=0.5]")
    assert torch.equal(dim.x, (m.x.float() * 0.5).round().to(torch.uint8))
    bright = data.load("mnist[brightness=1.8]")
    assert bright.x.max() == 255 and torch.equal(bright.x, (m.x.float() * 1.8).round().clamp(max=255).to(torch.uint8))
    o = data.load("overall")
    # the paper's shares: noise and constant 1,000 each of 10,000; the 3 offline natural sets share 8,000
    counts = o.y.bincount(minlength=8).tolist()
    assert o.x.shape == (10000, 1, 28, 28) and counts == [2667, 2667, 2666, 0, 0, 0, 1000, 1000]
    assert len(set(o.y[:60].tolist())) >= 5  # shuffled: the first images come from many sets
    first_mnist = o.x[o.y == 0][0]
    assert (m.x == first_mnist).flatten(1).all(1).any()  # the mnist part holds real MNIST test images
    noise = o.x[o.y == 6].float()
    assert abs(noise.mean().item() - 127.5) < 2 and noise.std().item() > 70  # uniform pixels, not Gaussian
    big = data.load("overall[size=32]")
    assert big.x.shape == (10000, 1, 32, 32) and torch.equal(big.y, o.y)
    big_noise = big.x[big.y == 6].float()  # drawn at 32×32: as rough as at 28, not interpolated
    assert (big_noise[..., 1:] - big_noise[..., :-1]).abs().mean() > 80
    equal = data.load("overall[mix=equal]")
    assert equal.x.shape == (6000, 1, 28, 28) and equal.y.bincount().tolist() == [1000] * 3 + [0] * 3 + [1000] * 3
    assert data.load("overall[channels=3,size=32]").x.shape == (10000, 3, 32, 32)
    assert torch.equal(data.load("overall").x, o.x)  # deterministic
    for bad, match in (("mnist[brightness=x]", "brightness"), ("overall[labels=1]", "labels"),
                       ("overall[mix=half]", "mix"), ("mnist[mix=paper]", "overall only")):
        with pytest.raises(data.DataError, match=match):
            data.load(bad)


def test_overall_counts_keep_the_papers_noise_share():
    assert data.overall_counts(8) == ([1000] * 8, [1000, 1000])  # the paper's ten sets
    nat, syn = data.overall_counts(3)
    assert sum(nat) == 8000 and syn == [1000, 1000] and max(nat) - min(nat) <= 1
    assert data.overall_counts(3, "equal") == ([1000] * 3, [1000] * 3)
    with pytest.raises(data.DataError, match="natural"):
        data.overall_counts(0)


@pytest.mark.parametrize("bad,match", [
    (dict(scores="rose,bogus"), "scores"), (dict(preconditioner="kfac"), "preconditioner"),
    (dict(rnd_perturbation="svd"), "rnd_perturbation"), (dict(lratio_perturbation="random:0"), "lratio_perturbation"),
    (dict(lratio_mu=0.0), "lratio_mu"), (dict(lratio_perturbation="svd:28", lratio_mu=0.2), "lratio_mu"),
    (dict(fisher_n=1), "fisher_n"), (dict(ood="mnist[brightness=-1]"), "brightness"),
    (dict(pad=True), "exclusive"), (dict(arch="resnet"), "arch"), (dict(rose_z="median"), "rose_z"),
    (dict(init="xavier"), "init"),
])
def test_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        build_config({"method": "rose", **bad})


def test_trial_trains_once_and_scores_many(tmp_path):
    base = dict(method="rose", train_n=128, test_n=32, epochs=1, width=4, latent_dim=3, fisher_n=32, iwae_k=2,
                device="cpu", vae_cache=str(tmp_path), ood="mnist,omniglot")
    a = rose.Experiment(build_config({**base, "scores": "rose_diag,rose_ekfac,nll,ic_png"}))
    assert not list(tmp_path.glob("vae-*.pt"))  # building the trial trains nothing
    res = a.step()
    assert_reports_validation_and_test_metrics(a.cfg, res)
    assert len(list(tmp_path.glob("vae-*.pt"))) == 1 and not list(tmp_path.glob("*.partial.pt"))
    assert a.done and res.epoch == 1
    for o in ("mnist", "omniglot"):
        for s in ("rose_diag", "rose_ekfac", "nll", "ic_png"):
            assert 0 <= res.metrics[f"auroc_{o}_{s}"] <= 1
    np.testing.assert_allclose(
        res.scores["mnist"]["ic_png"],
        res.scores["mnist"]["nll"] - lb.complexity_bpd(a.test["mnist"].x, "png").numpy(),
        rtol=1e-5,
    )
    b = rose.Experiment(build_config({**base, "scores": "rose", "preconditioner": "diag"}))  # another trial, same VAE
    res_b = b.step()
    assert len(list(tmp_path.glob("vae-*.pt"))) == 1
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q)
    np.testing.assert_allclose(res_b.scores["mnist"]["rose"], res.scores["mnist"]["rose_diag"], rtol=1e-5)
    torch.save(a.state_dict(), tmp_path / "s.pt")
    c = rose.Experiment(build_config({**base, "scores": "rose_diag"}))
    c.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert c.epoch == 1 and c.done and c.trained


def test_interrupted_vae_training_continues_from_its_last_epoch(tmp_path):
    """A training killed after epoch 1 of 2 continues from the progress file to the same weights."""
    x = _images(24, 3)
    full = _tiny(3, "plain").train()
    want = rose.train_vae(full, x, epochs=2, batch_size=8, lr=1e-2, seed=0, hflip=True)
    progress = tmp_path / "p.partial.pt"
    first = _tiny(3, "plain").train()
    rose.train_vae(first, x, epochs=1, batch_size=8, lr=1e-2, seed=0, hflip=True, progress=progress)
    resumed = _tiny(3, "plain").train()  # fresh weights: everything comes from the progress file
    got = rose.train_vae(resumed, x, epochs=2, batch_size=8, lr=1e-2, seed=0, hflip=True, progress=progress)
    assert got == pytest.approx(want, rel=1e-5)
    for p, q in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_hflip_mirrors_about_half_of_the_images():
    x = _images(400, 4)
    out = rose.hflip_half(x, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert bool((flipped | kept).all()) and 150 < int(flipped.sum()) < 250


def test_dcgan_init_is_the_authors():
    torch.manual_seed(0)
    m = RoseVAE(RoseVAEConfig(width=16, latent_dim=8))
    convs = [mod for mod in m.modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    w = torch.cat([c.weight.flatten() for c in convs])
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert all(b.bias.abs().max() == 0 for b in bns) and abs(torch.cat([b.weight for b in bns]).mean() - 1) < 0.01
    plain = RoseVAE(RoseVAEConfig(width=16, latent_dim=8, init="torch"))
    assert plain.body[0].weight.std() > 0.05  # PyTorch's kaiming-uniform, not 0.02


def test_study_trains_each_seeds_vae_once_in_the_driver_before_the_trials(tmp_path):
    """The rose study's own step (``before_run``, run by the shared runner after validation):
    every replicate's VAE is trained once and cached, so the trials only load and score them."""
    from oodlab.study import parse_args, resolve

    script = REPO / "studies" / "rose_perturbation.py"
    study = runpy.run_path(str(script))
    args = parse_args(str(script), study["configure"], ["--smoke", "--scores", "rose_diag", "--seeds", "2",
                                                       "--storage", str(tmp_path), "--train-n", "200",
                                                       "--width", "4", "--latent-dim", "3"])
    plan = resolve(study["build"](args), args)
    assert plan.before_run is not None
    plan.before_run(plan.fixed)
    cached = sorted((tmp_path / "vae_cache").glob("vae-*.pt"))
    assert len(cached) == 2  # one per seed
    stamps = [p.stat().st_mtime_ns for p in cached]
    plan.before_run(plan.fixed)  # cached: not trained again
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    res = run_trial({**plan.fixed, "seed": 1, "seeds": 1, "test_n": 30, "fisher_n": 20, "ood": "mnist"})
    assert 0.0 <= res.metrics["auroc_mnist_rose_diag"] <= 1.0
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # the trial loaded seed 1's VAE


@pytest.mark.parametrize("arch", ["plain", "dcgan_bn"])
def test_train_vae_micro_batches_give_the_one_pass_step(arch):
    """Without BN the batch is split into micro-batches (same step); with BN it is one pass in train mode."""
    m, ref, x = _tiny(5, arch), _tiny(5, arch).train(), _images(20, 5)
    assert m.rows_per_pass("cpu") < 20  # so the batch really is split
    history = rose.train_vae(m, x, epochs=1, batch_size=20, lr=1e-2, seed=0)  # micro-batches 8 + 8 + 4
    gen = torch.Generator().manual_seed(0)  # replay the one step as a single pass, same draws
    idx = next(iter(data.batch_indices(20, 20, shuffle=True, generator=gen, device=x.device)))
    eps = torch.randn(20, 3, generator=gen)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    loss = -elbo(ref, data.to_float(x[idx]), eps).mean() / ref.dims
    loss.backward()
    opt.step()
    assert history[0] == pytest.approx(loss.item(), rel=1e-5)  # the logged loss is the batch's, not a micro-batch's
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert any((p - q).abs().max() > 1e-3 for p, q in zip(m.parameters(), _tiny(5, arch).parameters()))  # it trained
    assert not m.training  # left in eval mode for scoring
    for a, b in zip(m.buffers(), ref.buffers()):  # BN running statistics: the whole batch's, as one pass
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_encode_copies_is_the_encoder_per_image():
    m, x = _tiny(6), data.to_float(_images(3, 6))
    copies = m.encoder_copies(3)
    with torch.no_grad():
        for got, want in zip(m.encode_copies(copies, x), m.encode(x)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        before = m.encode_copies(copies, x)[0]
        copies[_encoder_names(m).index("heads.0.weight")][1] += 0.1  # change copy 1's μ head only: image 1 alone moves
        moved = (m.encode_copies(copies, x)[0] - before).abs().amax(1)
    assert moved[1] > 1e-3 and moved[0] == 0 and moved[2] == 0
    for name, w in _as_conv_weights(m, m.encoder_copies(2)).items():
        torch.testing.assert_close(w[1], dict(m.named_parameters())[name])


def test_batchnorm_train_and_eval_modes_and_heads():
    m, x = _tiny(7), data.to_float(_images(4, 7))
    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert len(bns) == 6  # after each of 3 encoder and 3 decoder hidden convs
    assert [h.bias is not None for h in m.heads] == [True, True] and all(c.bias is None for c in m.body)
    with torch.no_grad():
        mu, logvar = m.encode(x)
        torch.testing.assert_close(mu, m.heads[0](_body(m, x)).flatten(1))  # separate μ and log σ² heads
        torch.testing.assert_close(logvar, m.heads[1](_body(m, x)).flatten(1).clamp(-30, 20))
        alone = m.encode(x[:1])[0]
        torch.testing.assert_close(alone, mu[:1])  # eval: an image's output does not depend on its batch
        m.train()
        assert not torch.allclose(m.encode(x)[0][:1], m.encode(x[:2])[0][:1])  # train: batch statistics couple images
    with pytest.raises(RuntimeError, match="eval mode"):
        rose.layer_terms(m, x, torch.zeros(4, 3))
    with pytest.raises(RuntimeError, match="eval mode"):
        m.encode_copies(m.encoder_copies(4), x)
    plain = _tiny(7, "plain")
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in plain.modules()) and len(plain.heads) == 1


def _body(m: RoseVAE, x: torch.Tensor) -> torch.Tensor:
    h = x
    for conv, bn in zip(m.body, m.norms):
        h = torch.relu(bn(conv(h)))
    return h


def test_resize_28_to_32_is_bilinear_like_torchvision(tmp_path):
    m = data.load("mnist[n=8]")
    r = data.resize(m.x, 32)
    assert r.shape == (8, 1, 32, 32) and r.dtype == torch.uint8
    for j in range(8):  # PIL's bilinear resize, which torchvision's transforms.Resize(32) calls on PIL images
        pil = Image.fromarray(m.x[j, 0].numpy()).resize((32, 32), Image.Resampling.BILINEAR)
        want = np.asarray(pil, dtype=np.int16)
        assert np.abs(r[j, 0].numpy().astype(np.int16) - want).max() <= 2
    small = dict(method="rose", train_n=64, test_n=16, epochs=1, width=4, latent_dim=3, ood="mnist", scores="nll",
                 iwae_k=1, device="cpu")
    exp = rose.Experiment(build_config(small))
    assert exp.train_x.shape[-2:] == (32, 32) and exp.test["mnist"].x.shape[-2:] == (32, 32)
    torch.testing.assert_close(exp.test["mnist"].x, data.resize(data.load("mnist").x[:16], 32))
    padded = rose.Experiment(build_config({**small, "resize": False, "pad": True, "arch": "plain"}))
    assert padded.test["mnist"].x[:, :, :2].max() == 0  # zero bands


def test_noise_and_constant_are_drawn_at_the_vaes_input_size():
    small = dict(method="rose", train_n=64, test_n=16, epochs=1, width=4, latent_dim=3, scores="nll", iwae_k=1,
                 device="cpu", ood="uniform_noise,constant,overall,mnist", val_ood="blobs")
    cfg = build_config(small)
    assert rose.input_sized_specs(cfg, 1) == {"uniform_noise": "uniform_noise[channels=1,size=32]",
                                              "constant": "constant[channels=1,size=32]",
                                              "overall": "overall[size=32]", "val_blobs": "blobs[channels=1,size=32]"}
    exp = rose.Experiment(cfg)
    torch.testing.assert_close(exp.test["uniform_noise"].x, data.load("uniform_noise[size=32]").x[:16])
    assert len(exp.test["overall"]) == 16 and exp.eval_sets["val_blobs"].x.shape == (16, 1, 32, 32)
    native = rose.Experiment(build_config({**small, "synth_at_input": False}))
    torch.testing.assert_close(native.test["constant"].x, data.resize(data.load("constant").x[:16], 32))
    assert rose.input_sized_specs(build_config({**small, "synth_at_input": False}), 1) == {}


def test_lratio_mu_sets_the_backgrounds_mu():
    assert build_config({"method": "rose", "lratio_mu": 0.237}).lratio_background == "random:0.237"
